"""The agent daemon against a protocol-speaking test double of the server.

``StreamPeer`` is a tiny in-test ``AgentService`` on 127.0.0.1:0: it welcomes, pushes
what a test tells it to, applies reports exactly once in seq order (recording any gap or
duplicate), and acknowledges cumulatively. The real server and agent are tested together
in tests/integration; these tests pin the agent's side of the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gyoza.agent.config import AgentConfig
from gyoza.agent.daemon import (
    CHANNEL_MAX_BACKOFF_S,
    NOT_ADOPTED,
    Agent,
    AgentError,
    ConnectionState,
)
from gyoza.agent.fleet import SimulatedFleet
from gyoza.agent.scripted import ScriptedExecutor
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import agent_service_pb2_grpc as pb_grpc
from gyoza.api.v1 import resources_pb2
from gyoza.mapping import event_type_from_proto
from gyoza.models.resources import EventType

pytestmark = pytest.mark.timeout(60)

Key = tuple[str, int]
WAIT_S = 15.0
OUTAGE_S = 8.0


@dataclass
class PeerSession:
    """One stream as the peer saw it."""

    hello: pb.Hello
    metadata: dict[str, str]
    outgoing: asyncio.Queue[pb.ConnectResponse | None] = field(default_factory=asyncio.Queue)
    received: list[pb.Report] = field(default_factory=list)
    batches: int = 0


class StreamPeer(pb_grpc.AgentServiceServicer):
    """The server's side of the agent stream, reduced to its rules."""

    def __init__(self, *, heartbeat_ms: int = 50) -> None:
        self.heartbeat_ms = heartbeat_ms
        self.sessions: list[PeerSession] = []
        self.applied: dict[Key, list[pb.Report]] = {}
        self.gaps: list[tuple[Key, int, int]] = []
        self.duplicates = 0
        self.replies: list[pb.AssignmentReply] = []
        self.heartbeats = 0
        self.assigned: set[Key] = set()
        #: Per session number: apply and acknowledge reports (False: drop them unseen).
        self.accepting: Callable[[int], bool] = lambda n: True
        #: Per session number: end the stream after this many reports arrived.
        self.close_after: Callable[[int], int | None] = lambda n: None
        #: Status to refuse every stream with.
        self.refuse: grpc.StatusCode | None = None
        self._changed = asyncio.Event()

    # -- what tests use -------------------------------------------------------------

    def send(self, **message: Any) -> None:
        """Push a message on the current stream."""
        if "assignment" in message:
            a = message["assignment"]
            self.assigned.add((a.run_id, a.attempt))
        self.sessions[-1].outgoing.put_nowait(pb.ConnectResponse(**message))

    async def until(self, predicate: Callable[[], bool], wait_s: float = WAIT_S) -> None:
        """Wait for a condition on what the peer has seen (no sleeping)."""

        async def wait() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), wait_s)

    def events(self, key: Key) -> list[EventType]:
        return [
            event_type_from_proto(r.event.type)
            for r in self.applied.get(key, [])
            if r.HasField("event")
        ]

    def ended(self, key: Key) -> bool:
        terminal = {EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED}
        return any(e in terminal for e in self.events(key))

    # -- the servicer -----------------------------------------------------------------

    async def Connect(  # type: ignore[override]  # context.write, not yield
        self,
        request_iterator: AsyncIterator[pb.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        iterator = aiter(request_iterator)
        first = await anext(iterator)
        assert first.WhichOneof("message") == "hello", "Hello first"
        if self.refuse is not None:
            await context.abort(self.refuse, "refused by the test")
        metadata = {str(k): str(v) for k, v in context.invocation_metadata() or ()}
        session = PeerSession(first.hello, metadata)
        self.sessions.append(session)
        number = len(self.sessions) - 1
        resume = [
            pb.Ack(
                run_id=h.run_id,
                attempt=h.attempt,
                seq=len(self.applied.get((h.run_id, h.attempt), [])),
            )
            for h in first.hello.held
            if (h.run_id, h.attempt) in self.assigned
        ]
        welcome = pb.Welcome(session_id=f"ses_{number}", resume=resume)
        welcome.heartbeat_interval.FromMilliseconds(self.heartbeat_ms)
        welcome.lease_timeout.FromSeconds(5)
        await context.write(pb.ConnectResponse(welcome=welcome))
        self._changed.set()
        reader = asyncio.create_task(self._read(iterator, session, number))
        writer = asyncio.create_task(self._write(session, context))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            self._changed.set()

    async def _write(
        self, session: PeerSession, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        while (message := await session.outgoing.get()) is not None:
            await context.write(message)

    async def _read(
        self, iterator: AsyncIterator[pb.ConnectRequest], session: PeerSession, number: int
    ) -> None:
        async for message in iterator:
            kind = message.WhichOneof("message")
            if kind == "heartbeat":
                self.heartbeats += 1
            elif kind == "assignment_reply":
                self.replies.append(message.assignment_reply)
            elif kind == "reports":
                self._reports(session, number, message.reports)
                limit = self.close_after(number)
                if limit is not None and len(session.received) >= limit:
                    self._changed.set()
                    return
            self._changed.set()

    def _reports(self, session: PeerSession, number: int, batch: pb.ReportBatch) -> None:
        session.received.extend(batch.reports)
        session.batches += 1
        if not self.accepting(number):
            return
        acks: dict[Key, int] = {}
        for report in batch.reports:
            key = (report.run_id, report.attempt)
            applied = self.applied.setdefault(key, [])
            if report.seq <= len(applied):
                self.duplicates += 1
            elif report.seq == len(applied) + 1:
                applied.append(report)
            else:
                self.gaps.append((key, len(applied), report.seq))
            acks[key] = len(applied)
        session.outgoing.put_nowait(
            pb.ConnectResponse(
                acks=pb.AckBatch(
                    acks=[pb.Ack(run_id=k[0], attempt=k[1], seq=s) for k, s in acks.items()]
                )
            )
        )

    async def ListAgents(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "test peer")

    async def DrainAgent(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "test peer")


def with_peer(
    test: Callable[[StreamPeer, str], Coroutine[Any, Any, None]], peer: StreamPeer | None = None
) -> None:
    """Run *test* with a peer serving on 127.0.0.1:0."""

    async def main() -> None:
        server = grpc.aio.server()
        servicer = peer or StreamPeer()
        pb_grpc.add_AgentServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await test(servicer, f"127.0.0.1:{port}")
        finally:
            await server.stop(None)

    asyncio.run(main())


def config(address: str, state_dir: Path, **changes: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "server": address,
        "name": "agent-t",
        "token": "tok-123",
        "state_dir": state_dir,
        "executor": "scripted",
        "gpus": "2x80G",
        "cpu": 8.0,
        "ram_mb": 32768,
        "labels": {"zone": "test"},
        "reconnect_initial_s": 0.01,
        "reconnect_max_s": 0.05,
    }
    values.update(changes)
    return AgentConfig(**values)


def assignment(run_id: str, attempt: int = 1, **inputs: Any) -> pb.Assignment:
    message = pb.Assignment(run_id=run_id, attempt=attempt, image="scripted")
    message.inputs.update(inputs)
    return message


def contiguous(peer: StreamPeer, key: Key) -> list[int]:
    return [r.seq for r in peer.applied.get(key, [])]


# -- tests ----------------------------------------------------------------------------


def test_hello_assignment_reports_acks_and_heartbeats(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            hello = peer.sessions[0].hello
            assert hello.agent_name == "agent-t"
            assert hello.capacity.cpu == 8.0 and hello.capacity.ram_mb == 32768
            assert [g.vram_total_mb for g in hello.capacity.gpus] == [81920, 81920]
            # The operator's labels, and the automatic ones runs may select by.
            assert dict(hello.labels) == {
                "zone": "test",
                "executor": "scripted",
                "gpu.count": "2",
                "gpu.model": "declared GPU (80 GiB)",
                "agent.version": hello.version,
            }
            assert list(hello.held) == [] and not hello.draining
            assert peer.sessions[0].metadata["authorization"] == "Bearer tok-123"

            peer.send(assignment=assignment("run_1", outputs={"y": 2}, sleep_ms=30))
            await peer.until(lambda: peer.ended(("run_1", 1)))
            assert peer.replies[0].accepted and peer.replies[0].run_id == "run_1"
            assert peer.events(("run_1", 1)) == [
                EventType.STARTED,
                EventType.PROGRESS,
                EventType.PROGRESS,
                EventType.PROGRESS,
                EventType.COMPLETED,
            ]
            assert contiguous(peer, ("run_1", 1)) == list(range(1, 9))
            assert peer.gaps == [] and peer.duplicates == 0
            # Acknowledged to the end: the attempt is forgotten.
            await asyncio.wait_for(agent.outbox.wait_empty(), WAIT_S)
            await peer.until(lambda: peer.heartbeats >= 2)
        assert agent.state is ConnectionState.STOPPED

    with_peer(test)


def test_reports_of_a_busy_agent_are_coalesced_into_few_batches(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        # 50 ms: far longer than the run takes to commit all its reports.
        async with Agent(config(address, tmp_path, coalesce_ms=50)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_c", sleep_ms=0, progress_steps=20))
            await peer.until(lambda: peer.ended(("run_c", 1)))
            reports = contiguous(peer, ("run_c", 1))
            assert reports == list(range(1, len(reports) + 1)) and len(reports) > 40
            assert peer.gaps == [] and peer.duplicates == 0
            # The first report goes at once; those after it, under load, wait for company.
            assert peer.sessions[0].batches <= 5, peer.sessions[0].batches

    with_peer(test)


def test_unacknowledged_reports_are_resent_in_order_after_a_reconnect(tmp_path: Path) -> None:
    peer = StreamPeer()
    # The first stream loses every report and breaks after the second one arrives.
    peer.accepting = lambda n: n > 0
    peer.close_after = lambda n: 2 if n == 0 else None

    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_r", sleep_ms=300, progress_steps=3))
            await peer.until(lambda: len(peer.sessions) >= 2)
            held = list(peer.sessions[1].hello.held)
            assert [(h.run_id, h.attempt) for h in held] == [("run_r", 1)]
            assert held[0].last_seq >= 2 and not held[0].finished
            await peer.until(lambda: peer.ended(("run_r", 1)))
            assert contiguous(peer, ("run_r", 1)) == list(range(1, 9))
            assert peer.gaps == [] and peer.duplicates == 0
            assert [r.seq for r in peer.sessions[1].received][:2] == [1, 2]

    with_peer(test, peer)


def test_an_assignment_whose_stream_ends_while_it_is_held_still_runs(tmp_path: Path) -> None:
    """The session's handler is cancelled while the hold commits (the stream ended just
    then): the attempt is held all the same, so it must also run, not wait forever."""
    peer = StreamPeer()

    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            session = agent._session
            assert session is not None
            handler = asyncio.create_task(
                agent.on_assignment(session, assignment("run_c", progress_steps=2))
            )
            await asyncio.sleep(0)  # the handler now waits on the outbox's commit
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
            assert agent.outbox.holds("run_c", 1)
            await peer.until(lambda: peer.ended(("run_c", 1)))
            seqs = contiguous(peer, ("run_c", 1))
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 3  # to its end

    with_peer(test, peer)


def test_welcome_resume_drops_what_the_server_already_has(tmp_path: Path) -> None:
    peer = StreamPeer()
    # The first stream applies reports but its acks never reach the agent (it breaks).
    peer.close_after = lambda n: 3 if n == 0 else None

    async def test(peer: StreamPeer, address: str) -> None:
        original = peer._reports

        def no_acks(session: PeerSession, number: int, batch: pb.ReportBatch) -> None:
            original(session, number, batch)
            if number == 0:
                while not session.outgoing.empty():
                    session.outgoing.get_nowait()

        peer._reports = no_acks  # type: ignore[method-assign]
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_w", sleep_ms=300))
            await peer.until(lambda: peer.ended(("run_w", 1)))
            assert contiguous(peer, ("run_w", 1)) == list(range(1, 9))
            assert peer.duplicates == 0 and peer.gaps == []
            first_applied = len(peer.sessions[0].received)
            assert min(r.seq for r in peer.sessions[1].received) == first_applied + 1

    with_peer(test, peer)


def test_agent_restart_adopts_the_scripted_run(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        key = ("run_k", 1)
        async with Agent(config(address, tmp_path)) as first:
            await asyncio.wait_for(first.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_k", sleep_ms=600, progress_steps=6))
            await peer.until(lambda: EventType.PROGRESS in peer.events(key))
        assert not peer.ended(key)
        async with Agent(config(address, tmp_path)) as second:
            await peer.until(lambda: peer.ended(key))
            assert [(h.run_id, h.attempt) for h in peer.sessions[1].hello.held] == [key]
            assert peer.events(key)[-1] is EventType.COMPLETED
            assert peer.events(key).count(EventType.STARTED) == 1
            assert contiguous(peer, key) == list(range(1, 15))
            assert peer.duplicates == 0 and peer.gaps == []
            await asyncio.wait_for(second.outbox.wait_empty(), WAIT_S)

    with_peer(test)


def test_an_attempt_that_cannot_be_adopted_fails(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        key = ("run_n", 1)
        async with Agent(config(address, tmp_path)) as first:
            await asyncio.wait_for(first.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_n", sleep_ms=60_000))
            await peer.until(lambda: EventType.STARTED in peer.events(key))
        executor = ScriptedExecutor(durable=False)
        async with Agent(config(address, tmp_path), executor=executor):
            await peer.until(lambda: peer.ended(key))
            failed = peer.applied[key][-1].event
            assert failed.failure_class == resources_pb2.FAILURE_CLASS_EXECUTOR_ERROR
            assert failed.error_message == NOT_ADOPTED

    with_peer(test)


def test_cancel_reports_cancelled(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        key = ("run_c", 1)
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_c", sleep_ms=60_000))
            peer.send(cancel=pb.Cancel(run_id="run_c", attempt=1, reason="stop it"))
            await peer.until(lambda: peer.ended(key))
            assert peer.events(key) == [EventType.STARTED, EventType.CANCELLED]
            assert peer.applied[key][-1].event.message == "stop it"
            await asyncio.wait_for(agent.outbox.wait_empty(), WAIT_S)

    with_peer(test)


def test_nack_with_drop_attempt_stops_and_forgets_it(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        key = ("run_d", 1)
        executor = ScriptedExecutor()
        async with Agent(config(address, tmp_path), executor=executor) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_d", sleep_ms=60_000))
            await peer.until(lambda: EventType.STARTED in peer.events(key))
            peer.send(
                nack=pb.Nack(
                    run_id="run_d", attempt=1, code=10, reason="STALE_ATTEMPT", drop_attempt=True
                )
            )
            await asyncio.wait_for(agent.outbox.wait_empty(), WAIT_S)
            await peer.until(lambda: executor.running == 0)
            # A nack without drop_attempt changes nothing.
            peer.send(assignment=assignment("run_e", sleep_ms=60_000))
            await peer.until(lambda: EventType.STARTED in peer.events(("run_e", 1)))
            peer.send(nack=pb.Nack(run_id="run_e", attempt=1, seq=1, reason="X"))
            peer.send(cancel=pb.Cancel(run_id="run_e", attempt=1))
            await peer.until(lambda: peer.ended(("run_e", 1)))
        assert peer.events(key) == [EventType.STARTED]  # no CANCELLED for a dropped attempt

    with_peer(test)


def test_drain_refuses_new_assignments(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_h", sleep_ms=200))
            peer.send(drain=pb.Drain(reason="maintenance"))
            peer.send(assignment=assignment("run_x"))
            await peer.until(lambda: len(peer.replies) == 2)
            assert [(r.run_id, r.accepted) for r in peer.replies] == [
                ("run_h", True),
                ("run_x", False),
            ]
            assert "draining" in peer.replies[1].reason
            assert agent.state is ConnectionState.DRAINING
            await peer.until(lambda: peer.ended(("run_h", 1)))  # held work goes on

    with_peer(test)


def test_a_server_drain_holds_for_its_session_and_ends_with_undrain(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)) as agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(drain=pb.Drain(reason="maintenance"))
            peer.send(assignment=assignment("run_x"))
            await peer.until(lambda: len(peer.replies) == 1)
            assert not peer.replies[0].accepted
            peer.send(undrain=pb.Undrain(reason="done"))
            peer.send(assignment=assignment("run_y"))
            await peer.until(lambda: len(peer.replies) == 2)
            assert peer.replies[1].accepted
            assert agent.state is ConnectionState.CONNECTED
            # The server keeps an operator's drain and says it again on each session:
            # the agent does not carry it over in its Hello.
            peer.send(drain=pb.Drain(reason="maintenance"))
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.DRAINING), WAIT_S)
            peer.sessions[-1].outgoing.put_nowait(None)  # the stream breaks
            await peer.until(lambda: len(peer.sessions) == 2)
            assert not peer.sessions[1].hello.draining
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)

    with_peer(test)


def test_shutdown_with_a_drain_timeout_waits_for_held_attempts(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        agent = Agent(config(address, tmp_path))
        async with agent:
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            peer.send(assignment=assignment("run_g", sleep_ms=200))
            await peer.until(lambda: EventType.STARTED in peer.events(("run_g", 1)))
            await agent.shutdown(drain_timeout_s=WAIT_S)
            assert peer.ended(("run_g", 1))

    with_peer(test)


def test_a_refused_token_stops_the_agent(tmp_path: Path) -> None:
    peer = StreamPeer()
    peer.refuse = grpc.StatusCode.UNAUTHENTICATED

    async def test(peer: StreamPeer, address: str) -> None:
        agent = Agent(config(address, tmp_path))
        with pytest.raises(AgentError, match="UNAUTHENTICATED") as caught:
            await asyncio.wait_for(agent.run(), WAIT_S)
        assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED
        assert agent.state is ConnectionState.STOPPED

    with_peer(test, peer)


def test_agent_reconnects_when_the_server_comes_up_late(tmp_path: Path) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        peer = StreamPeer()
        pb_grpc.add_AgentServiceServicer_to_server(peer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        agent = Agent(config(f"127.0.0.1:{port}", tmp_path))
        async with agent:
            # While the server is away the agent's call waits for it: CONNECTING.
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTING), WAIT_S)
            await server.start()
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
        await server.stop(None)

    asyncio.run(main())


def test_an_agent_is_back_soon_after_a_long_outage(tmp_path: Path) -> None:
    """With the default backoff: the server was away long enough for the agent's own
    backoff to grow to many seconds; the agent is back within a small multiple of the
    channel's capped backoff anyway, because its call waits on the channel."""

    async def main() -> None:
        server = grpc.aio.server()
        peer = StreamPeer()
        pb_grpc.add_AgentServiceServicer_to_server(peer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        defaults = {"reconnect_initial_s": 0.2, "reconnect_max_s": 30.0}
        agent = Agent(config(f"127.0.0.1:{port}", tmp_path, **defaults))
        async with agent:
            await asyncio.sleep(OUTAGE_S)  # the outage itself, not a wait for an event
            await server.start()
            await asyncio.wait_for(
                agent.wait_for_state(ConnectionState.CONNECTED), 5 * CHANNEL_MAX_BACKOFF_S
            )
        await server.stop(None)

    asyncio.run(main())


def test_one_state_directory_serves_one_agent(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        async with Agent(config(address, tmp_path)):
            with pytest.raises(AgentError, match="state directory"):
                async with Agent(config(address, tmp_path)):
                    pass

    with_peer(test)


def test_a_simulated_fleet_shares_one_loop(tmp_path: Path) -> None:
    async def test(peer: StreamPeer, address: str) -> None:
        async with SimulatedFleet(20, server=address, base_dir=tmp_path) as fleet:
            await asyncio.wait_for(fleet.wait_connected(), WAIT_S)
            assert {s.hello.agent_name for s in peer.sessions} == {
                f"sim-agent-{i:04d}" for i in range(20)
            }
            for n in range(len(peer.sessions)):
                peer.sessions[n].outgoing.put_nowait(
                    pb.ConnectResponse(assignment=assignment(f"run_{n}", sleep_ms=20))
                )
                peer.assigned.add((f"run_{n}", 1))
            await peer.until(lambda: all(peer.ended((f"run_{n}", 1)) for n in range(20)))
            assert peer.gaps == [] and peer.duplicates == 0

    with_peer(test)


def test_kill_9_and_restart_within_the_grace_the_run_goes_on(tmp_path: Path) -> None:
    """The agent as a process: SIGKILL it mid-run, start it again, the run completes."""

    async def start(address: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gyoza.agent",
            "--server",
            address,
            "--name",
            "agent-p",
            "--executor",
            "scripted",
            "--state-dir",
            str(tmp_path),
            "--log-level",
            "WARNING",
            env={**os.environ, "GYOZA_GPUS": "1x24G"},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

    async def test(peer: StreamPeer, address: str) -> None:
        key = ("run_p", 1)
        process = await start(address)
        try:
            await peer.until(lambda: len(peer.sessions) == 1)
            peer.send(assignment=assignment("run_p", sleep_ms=1500, progress_steps=10))
            await peer.until(lambda: EventType.PROGRESS in peer.events(key))
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
            assert not peer.ended(key)
            process = await start(address)
            await peer.until(lambda: peer.ended(key))
            assert peer.events(key)[-1] is EventType.COMPLETED
            assert contiguous(peer, key) == list(range(1, 23))
            assert peer.gaps == []
            assert [(h.run_id, h.attempt) for h in peer.sessions[-1].hello.held] == [key]
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), WAIT_S) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    with_peer(test)
