"""RunController on the in-memory store, with an agent link that records what it sends.

The link is the one fake here: it stands for agents' streams, whose real version the
integration tests cover. Everything else (store contract, scheduler, domain) is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from gyoza.models.errors import (
    AlreadyExists,
    InvalidInput,
    InvalidTransition,
    MalformedReport,
    NotAssignedToAgent,
    OpRunLockedException,
    StaleAttempt,
)
from gyoza.models.op_run import OpRun
from gyoza.models.reports import AgentReport, LogLine, ReportedEvent
from gyoza.models.resources import EventType, FailureClass, OpRunState
from gyoza.server.agent_protocol import HeldIn
from gyoza.server.control import ControlSettings, RunController
from gyoza.server.hub import Hub
from gyoza.server.scheduler import Placement, Scheduler
from gyoza.server.store import InMemoryStore

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class RecordingLink:
    """Agents that are connected and what was sent to them."""

    connected: set[str] = field(default_factory=set)
    assignments: list[tuple[str, str, int]] = field(default_factory=list)
    cancels: list[tuple[str, str, int]] = field(default_factory=list)
    sent: asyncio.Event = field(default_factory=asyncio.Event)

    def is_connected(self, agent: str) -> bool:
        return agent in self.connected

    def send_assignment(self, agent: str, run: OpRun, placement: Placement) -> bool:
        if agent not in self.connected:
            return False
        self.assignments.append((agent, run.id, run.current_attempt))
        self.sent.set()
        return True

    def send_cancel(self, agent: str, run_id: str, attempt: int, reason: str) -> bool:
        self.cancels.append((agent, run_id, attempt))
        return agent in self.connected


@dataclass
class Rig:
    store: InMemoryStore
    scheduler: Scheduler
    link: RecordingLink
    controller: RunController

    def join(self, agent: str) -> None:
        self.link.connected.add(agent)
        self.scheduler.upsert_agent(agent, cpu=8, ram_mb=16_000, gpus=[])
        self.controller.agent_ready()

    async def assigned(self) -> tuple[str, str, int]:
        await asyncio.wait_for(self.link.sent.wait(), 5)
        self.link.sent.clear()
        return self.link.assignments[-1]


def run_with(scenario: Callable[[Rig], Awaitable[None]], **settings: float) -> None:
    async def main() -> None:
        store = InMemoryStore()
        scheduler = Scheduler()
        link = RecordingLink()
        controller = RunController(
            store,
            Hub(),
            scheduler,
            link,
            settings=ControlSettings(**settings),
            max_outputs_bytes=64,
        )
        await controller.start()
        try:
            await scenario(Rig(store, scheduler, link, controller))
        finally:
            await controller.stop()

    asyncio.run(main())


def event(
    run_id: str, seq: int, kind: EventType, attempt: int = 1, **fields: object
) -> AgentReport:
    return AgentReport(run_id, attempt, seq, NOW, event=ReportedEvent(kind, **fields))  # type: ignore[arg-type]


def test_a_created_run_is_assigned_to_a_connected_agent_and_committed() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        run = await rig.controller.create_run(OpRun.create(image="busybox"))
        assert await rig.assigned() == ("a1", run.id, 1)
        stored = await rig.store.get_run(run.id)
        assert stored.state is OpRunState.ASSIGNED
        assert stored.execution_summary.worker_id == "a1"

    run_with(scenario)


def test_reports_are_applied_once_in_order_and_the_domain_moves_the_watermark() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        run = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        started = event(run.id, 1, EventType.STARTED)
        logs = AgentReport(run.id, 1, 2, NOW, lines=(LogLine("hello"),))
        acks, nacks = await rig.controller.apply_reports("a1", [started, logs])
        assert [(a.seq, nacks) for a in acks] == [(2, [])]
        # Sent again (a reconnect): acknowledged again, applied once.
        acks, _ = await rig.controller.apply_reports("a1", [started])
        assert acks[0].seq == 2
        stored = await rig.store.get_run(run.id)
        assert [e.type for e in stored.events].count("STARTED") == 1
        assert stored.current_op_attempt.reported_seq == 2
        lines, _ = await rig.store.read_logs(run.id, 1)
        assert [line.text for line in lines] == ["hello"]
        # A gap stops the group: seq 4 waits for 3.
        acks, _ = await rig.controller.apply_reports("a1", [event(run.id, 4, EventType.INFO)])
        assert acks[0].seq == 2

    run_with(scenario)


def test_refusals_carry_domain_errors_and_consume_their_seq() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        run = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        malformed = AgentReport(run.id, 1, 1, NOW, refusal="no body")
        premature = event(run.id, 2, EventType.STARTED)  # fine
        again = event(run.id, 3, EventType.STARTED)  # RUNNING already: invalid transition
        acks, nacks = await rig.controller.apply_reports("a1", [malformed, premature, again])
        assert acks[0].seq == 3
        assert [type(n.error) for n in nacks] == [MalformedReport, InvalidTransition]
        assert not any(n.drop_attempt for n in nacks)

        _, stale = await rig.controller.apply_reports("a1", [event(run.id, 4, EventType.INFO, 9)])
        _, foreign = await rig.controller.apply_reports("a2", [event(run.id, 4, EventType.INFO)])
        assert isinstance(stale[0].error, StaleAttempt) and stale[0].drop_attempt
        assert isinstance(foreign[0].error, NotAssignedToAgent) and foreign[0].drop_attempt

    run_with(scenario)


def test_outputs_over_the_limit_fail_the_attempt_as_output_invalid() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        run = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        big = ReportedEvent(EventType.COMPLETED, outputs={"x": "y" * 100}, outputs_bytes=110)
        await rig.controller.apply_reports(
            "a1",
            [
                event(run.id, 1, EventType.STARTED),
                AgentReport(run.id, 1, 2, NOW, event=big),
            ],
        )
        stored = await rig.store.get_run(run.id)
        assert stored.state is OpRunState.FAILED
        assert stored.execution_summary.failure_class is FailureClass.OUTPUT_INVALID
        assert stored.outputs == {}

    run_with(scenario)


def test_reconnect_resumes_what_both_agree_on_and_releases_the_rest() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        kept = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        lost = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        await rig.controller.apply_reports("a1", [event(kept.id, 1, EventType.STARTED)])
        result = await rig.controller.agent_connected(
            "a1", [HeldIn(kept.id, 1, 1), HeldIn("run_unknown", 1, 3)]
        )
        assert [(a.run_id, a.seq) for a in result.resume] == [(kept.id, 1)]
        assert [(n.run_id, n.drop_attempt) for n in result.drop] == [("run_unknown", True)]
        released = await rig.controller.get_run(lost.id)
        assert released.current_attempt == 2
        # Released, it is queued again and goes back to the connected agent.
        assert await rig.assigned() == ("a1", lost.id, 2)

    run_with(scenario)


def test_a_silent_agent_is_lost_after_lease_and_grace() -> None:
    async def scenario(rig: Rig) -> None:
        rig.join("a1")
        run = await rig.controller.create_run(OpRun.create(image="busybox"))
        await rig.assigned()
        async with rig.controller.hub.subscribe_run(run.id) as changes:
            rig.link.connected.discard("a1")
            rig.controller.agent_disconnected("a1", asyncio.get_running_loop().time())
            while (await rig.controller.get_run(run.id)).attempts[0].state.on_agent:
                await asyncio.wait_for(changes.get(), 5)
        first = (await rig.store.get_run(run.id)).attempts[0]
        assert first.execution_summary.failure_class is FailureClass.AGENT_LOST

    run_with(scenario, lease_timeout_s=0.01, grace_s=0.01)


def test_client_rules_have_one_home() -> None:
    async def scenario(rig: Rig) -> None:
        run = await rig.controller.create_run(OpRun.create(image="busybox", request_id="r1"))
        same = await rig.controller.create_run(OpRun.create(image="busybox", request_id="r1"))
        assert same.id == run.id
        with pytest.raises(AlreadyExists):
            await rig.controller.create_run(OpRun.create(image="other", request_id="r1"))
        with pytest.raises(InvalidInput):
            await rig.controller.set_priority(run.id, -1)
        await rig.controller.cancel_run(run.id)
        with pytest.raises(OpRunLockedException):
            await rig.controller.set_priority(run.id, 3)

    run_with(scenario)
