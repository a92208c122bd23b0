"""The run controller: the only code that changes runs.

It keeps the active runs in memory (:class:`~gyoza.server.active_runs.ActiveRuns`),
applies one domain operation at a time per run, persists the run and the events the
operation added in one transaction (group-committed with every other write), and only
then publishes the change (watchers, topic subscribers) and updates the scheduler. A
caller that gets a result knows it is durable.

Its parts, each in its own module and built in one place (:mod:`gyoza.server.bootstrap`):
the agent protocol's rules (:mod:`gyoza.server.agent_protocol`: reconciliation, report
fencing and consumption, as functions over the domain that return acks and nacks), its
timers for automatic retries, lost agents and queue timeouts (:mod:`gyoza.server.timers`),
placement passes (:mod:`gyoza.server.placement`, which also records pending reasons) and
the scheduler. It is typed against the
:class:`~gyoza.server.store.protocol.RunStore` protocol and reaches agents through an
:class:`AgentLink` (the session registry), both passed in.

Transport-neutral: the gRPC servicers and agent sessions call it with domain values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from gyoza.models.errors import AlreadyExists, NotFound, RunNotFinished
from gyoza.models.op_run import OpRun, RunRequest
from gyoza.models.reports import AgentReport
from gyoza.models.resources import (
    EventEntry,
    EventType,
    FailureClass,
    OpRunState,
    PendingReason,
    PendingReasonCode,
)
from gyoza.models.timestamps import utc_now
from gyoza.server import metrics
from gyoza.server.active_runs import ActiveRuns
from gyoza.server.agent_protocol import (
    AckOut,
    HeldIn,
    NackOut,
    Reconciliation,
    consume_reports,
    fence_reports,
    reconcile_held,
)
from gyoza.server.hub import Hub
from gyoza.server.placement import PlacementPass
from gyoza.server.scheduler import DEFAULT_STARVATION_S, Placement, Scheduler
from gyoza.server.store.protocol import RunStore
from gyoza.server.timers import Background, Timers

log = logging.getLogger("gyoza.control")

T = TypeVar("T")

#: Largest outputs document an attempt may report, by default (its encoded size).
MAX_OUTPUTS_BYTES = 1 << 20

__all__ = [
    "AckOut",
    "AgentLink",
    "ControlSettings",
    "HeldIn",
    "NackOut",
    "Reconciliation",
    "RunController",
]


@dataclass(frozen=True)
class ControlSettings:
    """Timing of the agent protocol.

    Parameters
    ----------
    heartbeat_interval_s : float
        How often agents send a heartbeat.
    lease_timeout_s : float
        Silence after which an agent is lost.
    grace_s : float
        How long a lost agent's attempts wait for it to come back before they fail as
        ``AGENT_LOST``.
    starvation_s : float
        How long the first waiting run may be overtaken by runs that fit before an
        agent is held for it (see :mod:`gyoza.server.scheduler`).
    """

    heartbeat_interval_s: float = 5.0
    lease_timeout_s: float = 15.0
    grace_s: float = 30.0
    starvation_s: float = DEFAULT_STARVATION_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ControlSettings:
        """Settings from ``GYOZA_HEARTBEAT_INTERVAL_S``, ``GYOZA_LEASE_TIMEOUT_S``,
        ``GYOZA_GRACE_S`` and ``GYOZA_STARVATION_S`` (seconds), defaults for the ones
        not set."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            heartbeat_interval_s=float(
                env.get("GYOZA_HEARTBEAT_INTERVAL_S", default.heartbeat_interval_s)
            ),
            lease_timeout_s=float(env.get("GYOZA_LEASE_TIMEOUT_S", default.lease_timeout_s)),
            grace_s=float(env.get("GYOZA_GRACE_S", default.grace_s)),
            starvation_s=float(env.get("GYOZA_STARVATION_S", default.starvation_s)),
        )


class AgentLink(Protocol):
    """How the controller reaches connected agents (the session registry)."""

    def is_connected(self, agent: str) -> bool:
        """True when the agent has a live session."""
        ...

    def send_assignment(self, agent: str, run: OpRun, placement: Placement) -> bool:
        """Queue an assignment on the agent's stream; False when it has no session."""
        ...

    def send_cancel(self, agent: str, run_id: str, attempt: int, reason: str) -> bool:
        """Queue a cancel on the agent's stream; False when it has no session."""
        ...


def _marks(run: OpRun) -> dict[int, int]:
    return {a.attempt: len(a.events) for a in run.attempts}


def _new_events(run: OpRun, marks: dict[int, int]) -> list[tuple[int, EventEntry]]:
    new: list[tuple[int, EventEntry]] = []
    for attempt in run.attempts:
        for entry in attempt.events[marks.get(attempt.attempt, 0) :]:
            new.append((attempt.attempt, entry))
    return new


def _recorded_reasons(run: OpRun) -> frozenset[PendingReasonCode]:
    """Pending reasons already recorded as events of the current attempt (so that a
    restarted server does not record them again)."""
    codes = set()
    for entry in run.events:
        code = entry.payload.get("pending_reason") if entry.type == EventType.INFO else None
        if isinstance(code, str) and code in PendingReasonCode.__members__:
            codes.add(PendingReasonCode(code))
    return frozenset(codes)


class _Skip(Exception):
    """An operation found nothing to do once it held the run's lock."""


class RunController:
    """Applies every change to runs, durably, then publishes it.

    Parameters
    ----------
    store : RunStore
        The durable store.
    hub : Hub
        Fan-out of committed changes.
    scheduler : Scheduler
        The queue and the agents' free resources.
    link : AgentLink
        How assignments and cancels reach agents.
    settings : ControlSettings
        Agent protocol timing.
    max_outputs_bytes : int
        Largest outputs an attempt may report; larger ones fail it as OUTPUT_INVALID.
    """

    def __init__(
        self,
        store: RunStore,
        hub: Hub,
        scheduler: Scheduler,
        link: AgentLink,
        *,
        settings: ControlSettings,
        max_outputs_bytes: int = MAX_OUTPUTS_BYTES,
    ) -> None:
        self.store = store
        self.hub = hub
        self.scheduler = scheduler
        self.settings = settings
        self._link = link
        self._max_outputs_bytes = max_outputs_bytes
        self._runs = ActiveRuns(store)
        self._background = Background()
        self._retry_timers: Timers[str] = Timers(self._background)
        self._lost_timers: Timers[str] = Timers(self._background)
        self._queue_timers: Timers[str] = Timers(self._background)
        self._placement = PlacementPass(
            scheduler,
            lambda p: self._background.spawn(self._assign(p)),
            lambda run_id, attempt, reason: self._background.spawn(
                self._record_pending_reason(run_id, attempt, reason)
            ),
        )
        # Agents a run must not go back to (they refused its current attempt).
        self._avoid: dict[str, frozenset[str]] = {}
        # Agents that held runs at start, and the latest of those runs' changes.
        self._absent: dict[str, datetime] = {}

    # ------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------
    async def start(self) -> None:
        """Rebuild the in-memory view from the store: the queue, the reservations of
        runs that agents hold, and the automatic retry timers."""
        runs = await self.store.load_active_runs()
        # While agents reconnect, "no agent" says nothing about a run: reasons are shown
        # at once but recorded as events only after one lease timeout.
        self._placement.record_reasons_from(time.monotonic() + self.settings.lease_timeout_s)
        holders: set[str] = set()
        for run in runs:
            self._runs.keep(run)
            if run.state is OpRunState.PENDING:
                self._enqueue(run)
            elif run.on_agent:
                agent = run.execution_summary.worker_id or ""
                self._reserve(agent, run)
                holders.add(agent)
            elif run.is_active:
                self._arm_retry(run)
        # Agents that held runs when the server stopped: see open_reconnect_windows.
        self._absent = {
            agent: max(
                (r.updated_at for r in runs if r.execution_summary.worker_id == agent),
                default=datetime.now(UTC),
            )
            for agent in holders
        }
        log.info(
            "controller started",
            extra={"active_runs": len(runs), "queued": self.scheduler.queue_depth},
        )
        self._placement.request()

    async def open_reconnect_windows(self, *, takeover: bool = False) -> None:
        """Once the server serves: start the lease clocks of agents that held runs when
        it stopped and have not reconnected yet.

        Such an agent is lost a lease and a grace period after it was last heard from
        (kept in the store), or one lease after the first restart since then, whichever
        is later: a live agent, back within seconds, gets one lease to reconnect, and a
        server restarting again and again never extends that (the window's start is
        kept in the store too), so a dead agent's runs are retried all the same.

        On a *takeover* (this replica took the leadership over from another), the
        window is a lease plus the grace: the agents of the replica that went away need
        time to find another address, and none is lost sooner than that.
        """
        absent = {a: t for a, t in self._absent.items() if not self._link.is_connected(a)}
        self._absent = {}
        if not absent:
            return
        now_wall = datetime.now(UTC)
        windows = await self.store.open_reconnect_windows(absent, now_wall)
        now = asyncio.get_running_loop().time()
        lease, grace = self.settings.lease_timeout_s, self.settings.grace_s
        for agent, (last_wall, window_wall) in windows.items():
            if self._link.is_connected(agent):
                continue  # reconnected meanwhile
            last = now - (now_wall - last_wall).total_seconds()
            window = now - (now_wall - window_wall).total_seconds()
            window_end = window + lease + (grace if takeover else 0.0)
            self._arm_lost(agent, last, deadline=max(last + lease + grace, window_end))

    async def stop(self) -> None:
        """Stop timers and wait for background work to finish."""
        self._placement.stop()
        self._retry_timers.clear()
        self._lost_timers.clear()
        self._queue_timers.clear()
        await self._background.stop()

    # ------------------------------------------------------------------
    # Client operations
    # ------------------------------------------------------------------
    async def find_request(self, request_id: str, request: RunRequest) -> OpRun | None:
        """The run an earlier create with *request_id* made, if any (idempotent create).

        Raises
        ------
        AlreadyExists
            When that run does not answer *request* (:meth:`OpRun.answers`).
        """
        existing = await self.store.get_run_by_request_id(request_id)
        if existing is None:
            return None
        if not existing.answers(request):
            raise AlreadyExists(
                f"request_id {request_id!r} was already used by run {existing.id} "
                "for a different request"
            )
        return self._runs.cached(existing.id) or existing

    async def create_run(self, run: OpRun, request: RunRequest | None = None) -> OpRun:
        """Store a new run and queue it. Idempotent on ``run.request_id``: a create that
        reuses it answers with the first run when that run answers *request* (by
        default, the request *run* answers).

        Raises
        ------
        AlreadyExists
            When the request id was used for a different request.
        """
        asked = request or RunRequest.of(run)
        if run.request_id:
            existing = await self.find_request(run.request_id, asked)
            if existing is not None:
                return existing
        try:
            await self.store.create_run(run)
        except AlreadyExists:
            # Another create with the same request id committed first.
            existing = await self.find_request(run.request_id, asked) if run.request_id else None
            if existing is None:
                raise
            return existing
        self._runs.keep(run)
        self.hub.publish_run(run, _new_events(run, {}))
        self._enqueue(run)
        self._placement.request()
        return run

    def pending_reason(self, run_id: str) -> PendingReason | None:
        """Why a pending run waits, as of the last placement pass (None otherwise)."""
        return self.scheduler.pending_reason(run_id)

    async def get_run(self, run_id: str) -> OpRun:
        """The run: active runs from memory, the others from the store.

        Raises
        ------
        NotFound
            When there is no such run.
        """
        return await self._runs.get(run_id)

    async def cancel_run(self, run_id: str, reason: str = "") -> OpRun:
        """Cancel a run: a PENDING one at once; an assigned one through its agent.

        Raises
        ------
        OpRunLockedException
            When the run is already terminal.
        """

        def op(run: OpRun) -> bool:
            return run.request_cancel(reason)

        run, done = await self._mutate(run_id, op)
        if not done and run.on_agent:
            agent = run.execution_summary.worker_id or ""
            self._link.send_cancel(agent, run.id, run.current_attempt, reason or "cancelled")
        return run

    async def retry_run(self, run_id: str) -> OpRun:
        """Start a new attempt of a FAILED or CANCELLED run.

        Raises
        ------
        InvalidTransition
            When the run is not FAILED or CANCELLED.
        """

        def op(run: OpRun) -> None:
            run.retry(force=True, reason="retry requested")

        run, _ = await self._mutate(run_id, op)
        return run

    async def delete_run(self, run_id: str) -> None:
        """Delete a finished run with its events, logs and topic records.

        Raises
        ------
        NotFound
            When there is no such run.
        RunNotFinished
            When the run may still change (active, or waiting for an automatic retry).
        """
        async with self._runs.lock(run_id):
            run = self._runs.cached(run_id)
            if run is not None:
                raise RunNotFinished(
                    f"run {run_id} is {run.state.value}"
                    + (" and waits for an automatic retry" if run.state.is_terminal else "")
                    + "; only finished runs can be deleted"
                )
            await self.store.delete_run(run_id)

    def busy_runs(self) -> frozenset[str]:
        """Runs under an operation now (their lock is alive): retention leaves them alone.

        The other runs held in memory are active, or FAILED waiting for a retry, which
        the store never counts as finished.
        """
        return self._runs.locked()

    async def set_priority(self, run_id: str, priority: int) -> OpRun:
        """Change a run's priority; a pending run moves in the queue at once.

        Raises
        ------
        InvalidInput
            When the priority is negative.
        OpRunLockedException
            When the run is terminal.
        """
        run, _ = await self._mutate(run_id, lambda run: run.change_priority(priority))
        self.scheduler.reprioritize(run.id, priority)
        self._placement.request()
        return run

    # ------------------------------------------------------------------
    # Agent side
    # ------------------------------------------------------------------
    async def agent_connected(self, agent: str, held: Sequence[HeldIn]) -> Reconciliation:
        """An agent (re)connected: keep what both sides agree it holds, drop what the
        server no longer wants it to run, release what it lost."""
        self._lost_timers.cancel(agent)
        result = Reconciliation()
        held_keys = set()
        for item in held:
            held_keys.add(item.run_id)
            try:
                run: OpRun | None = await self.get_run(item.run_id)
            except NotFound:
                run = None
            answer = reconcile_held(run, item, agent)
            if isinstance(answer, NackOut):
                result.drop.append(answer)
                continue
            result.resume.append(answer)
            if run is not None and run.on_agent:
                if self.scheduler.holder(run.id) != agent:
                    self._reserve(agent, run)
                if run.cancel_requested:
                    result.cancel.append((run.id, run.current_attempt, "cancel requested"))
        # Runs the server thinks this agent holds but it does not report: released.
        lost = [run.id for run in self._held_by(agent) if run.id not in held_keys]
        for run_id in lost:
            await self._release(
                run_id,
                None,
                agent,
                "the agent no longer holds the attempt",
                FailureClass.AGENT_LOST,
            )
        return result

    def agent_ready(self) -> None:
        """An agent joined, reported capacity or finished draining: try placement."""
        self._placement.request()

    def agent_disconnected(self, agent: str, last_seen: float) -> None:
        """An agent's session ended or went silent (``last_seen`` in loop time): its
        attempts wait for the lease and the grace period, then fail as AGENT_LOST."""
        self.scheduler.set_connected(agent, False)
        self._arm_lost(agent, last_seen)

    async def reply(
        self, agent: str, run_id: str, attempt: int, accepted: bool, reason: str
    ) -> None:
        """An agent accepted or refused an assignment; a refusal releases it.

        An acceptance changes nothing (the run is ASSIGNED to the agent already): the
        agent service relies on that to apply the reports queued on either side of one
        in a single group."""
        if accepted:
            return
        await self._release(
            run_id,
            attempt,
            agent,
            f"refused by agent {agent}" + (f": {reason}" if reason else ""),
            FailureClass.EXECUTOR_ERROR,
            avoid=agent,
        )

    async def apply_reports(
        self, agent: str, reports: Sequence[AgentReport]
    ) -> tuple[list[AckOut], list[NackOut]]:
        """Apply an agent's reports exactly once, in order, and say what is durable.

        Reports are grouped by attempt; each group is applied under that run's lock and
        committed in one write. A report whose seq is at or below the attempt's
        watermark was applied before and is acknowledged again without effect.
        """
        started = time.perf_counter()
        groups: dict[tuple[str, int], list[AgentReport]] = {}
        for report in reports:
            groups.setdefault((report.run_id, report.attempt), []).append(report)
        results = await asyncio.gather(
            *(self._apply_group(agent, key, group) for key, group in groups.items())
        )
        acks: list[AckOut] = []
        nacks: list[NackOut] = []
        for ack, group_nacks in results:
            if ack is not None:
                acks.append(ack)
            nacks.extend(group_nacks)
        metrics.EVENT_APPLY_SECONDS.observe(time.perf_counter() - started)
        return acks, nacks

    async def _apply_group(
        self, agent: str, key: tuple[str, int], group: list[AgentReport]
    ) -> tuple[AckOut | None, list[NackOut]]:
        run_id, attempt_no = key
        async with self._runs.lock(run_id):
            try:
                run: OpRun | None = await self.get_run(run_id)
            except NotFound:
                run = None
            refused = fence_reports(run, run_id, attempt_no, agent, group[0].seq)
            if refused is not None or run is None:
                return None, [refused] if refused is not None else []
            marks = _marks(run)
            before = run.state
            consumed = consume_reports(
                run, attempt_no, group, max_outputs_bytes=self._max_outputs_bytes
            )
            if not consumed.changed:
                return consumed.ack, consumed.nacks
            try:
                # One write: the run row carries the watermark that covers these lines,
                # so both commit together or neither does (a watermark committed alone
                # would tell the agent to drop lines that were never stored).
                logs = (attempt_no, consumed.lines) if consumed.lines else None
                await self._commit(run, marks, before, logs=logs)
            except BaseException:
                self._runs.forget(run_id)
                raise
            return consumed.ack, consumed.nacks

    def _held_by(self, agent: str) -> list[OpRun]:
        return [
            run for run in self._runs if run.on_agent and run.execution_summary.worker_id == agent
        ]

    # ------------------------------------------------------------------
    # Internals: mutation and commit
    # ------------------------------------------------------------------
    async def _mutate(self, run_id: str, op: Callable[[OpRun], T]) -> tuple[OpRun, T]:
        async with self._runs.lock(run_id):
            run = await self.get_run(run_id)
            marks = _marks(run)
            before = run.state
            before_retry = run.next_retry_at
            result = op(run)  # the domain refuses before it changes anything
            self._runs.keep(run)
            try:
                await self._commit(run, marks, before, before_retry)
            except BaseException:
                self._runs.forget(run_id)
                raise
            return run, result

    async def _commit(
        self,
        run: OpRun,
        marks: dict[int, int],
        before: OpRunState,
        before_retry: datetime | None = None,
        logs: tuple[int, list[tuple[str, str, datetime]]] | None = None,
    ) -> None:
        if (
            run.state is OpRunState.FAILED
            and run.next_retry_at is None
            and before is not OpRunState.FAILED
        ):
            run.schedule_auto_retry()
        new = _new_events(run, marks)
        if logs is None:
            records = await self.store.save_run(run, new)
        else:
            records, last_line = await self.store.save_run_with_logs(run, new, *logs)
            self.hub.publish_logs(run.id, logs[0], last_line)
        self._after_commit(run, before, before_retry)
        self.hub.publish_run(run, new)
        if records:
            self.hub.publish_topic(records)

    def _after_commit(self, run: OpRun, before: OpRunState, before_retry: datetime | None) -> None:
        state = run.state
        if state is not OpRunState.PENDING:
            self._queue_timers.cancel(run.id)
        if state is OpRunState.PENDING:
            if before is not OpRunState.PENDING:
                self.scheduler.release(run.id)
                self._enqueue(run)
                self._placement.request()
        elif state.is_terminal:
            self.scheduler.dequeue(run.id)
            freed = self.scheduler.release(run.id) is not None
            if run.is_active:  # failed, an automatic retry scheduled
                if run.next_retry_at != before_retry or run.id not in self._retry_timers:
                    self._arm_retry(run)
            else:
                self._retry_timers.cancel(run.id)
                self._runs.forget(run.id)
            if freed:
                self._placement.request()

    def _enqueue(self, run: OpRun) -> None:
        self._arm_queue_timeout(run)
        self.scheduler.enqueue(
            run.id,
            run.current_attempt,
            run.priority,
            run.created_at,
            run.constraints,
            self._avoid.pop(run.id, frozenset()),
            recorded=_recorded_reasons(run),
        )

    def _reserve(self, agent: str, run: OpRun) -> None:
        self.scheduler.reserve(
            agent,
            run.id,
            run.current_attempt,
            run.constraints,
            tuple(run.execution_summary.gpu_ids),
        )

    # ------------------------------------------------------------------
    # Internals: assignment and release
    # ------------------------------------------------------------------
    async def _assign(self, placement: Placement) -> None:
        async with self._runs.lock(placement.run_id):
            run = self._runs.cached(placement.run_id)
            if (
                run is None
                or run.state is not OpRunState.PENDING
                or run.current_attempt != placement.attempt
                or not self._link.is_connected(placement.agent)
            ):
                self.scheduler.release(placement.run_id)
                if run is not None and run.state is OpRunState.PENDING:
                    self._enqueue(run)
                return
            marks = _marks(run)
            run.assign(placement.agent, list(placement.gpu_ids))
            try:
                await self._commit(run, marks, OpRunState.PENDING)
            except BaseException:
                self.scheduler.release(run.id)
                self._runs.forget(run.id)
                raise
            sent = self._link.send_assignment(placement.agent, run, placement)
        if not sent:
            await self._release(
                placement.run_id,
                placement.attempt,
                placement.agent,
                "agent disconnected before the assignment was sent",
                FailureClass.AGENT_LOST,
            )

    async def _release(
        self,
        run_id: str,
        attempt: int | None,
        agent: str,
        reason: str,
        failure_class: FailureClass,
        avoid: str | None = None,
    ) -> None:
        async with self._runs.lock(run_id):
            run = self._runs.cached(run_id)
            if (
                run is None
                or not run.on_agent
                or (attempt is not None and run.current_attempt != attempt)
                or run.execution_summary.worker_id != agent
            ):
                return
            marks = _marks(run)
            before = run.state
            run.release_assignment(reason, failure_class)
            if avoid:
                # Queue it away from the agent that refused it.
                self._avoid[run_id] = frozenset({avoid})
            try:
                await self._commit(run, marks, before)
            except BaseException:
                self._runs.forget(run_id)
                raise

    # ------------------------------------------------------------------
    # Internals: timers
    # ------------------------------------------------------------------
    def _arm_retry(self, run: OpRun) -> None:
        if run.next_retry_at is None:
            self._retry_timers.cancel(run.id)
            return
        delay = (run.next_retry_at - datetime.now(run.next_retry_at.tzinfo)).total_seconds()
        run_id = run.id
        self._retry_timers.arm_in(run_id, delay, lambda: self._auto_retry(run_id))

    async def _auto_retry(self, run_id: str) -> None:
        def op(run: OpRun) -> None:
            if run.state is not OpRunState.FAILED or run.next_retry_at is None:
                raise _Skip()
            failure = run.execution_summary.failure_class
            run.retry(
                force=True,
                reason="automatic retry after "
                + (failure.value if failure is not None else "failure"),
            )

        try:
            await self._mutate(run_id, op)
        except (_Skip, NotFound):
            return

    def _arm_queue_timeout(self, run: OpRun) -> None:
        limit = run.constraints.queue_timeout_s
        if limit is None:
            self._queue_timers.cancel(run.id)
            return
        waited = (utc_now() - run.queued_since()).total_seconds()
        run_id, attempt = run.id, run.current_attempt
        self._queue_timers.arm_in(
            run_id, limit - waited, lambda: self._queue_timeout(run_id, attempt)
        )

    async def _queue_timeout(self, run_id: str, attempt: int) -> None:
        """The attempt waited past its queue timeout: it fails as QUEUE_TIMEOUT (and is
        retried or not by its policy)."""

        def op(run: OpRun) -> None:
            if run.state is not OpRunState.PENDING or run.current_attempt != attempt:
                raise _Skip()
            run.expire_in_queue((utc_now() - run.queued_since()).total_seconds())

        try:
            await self._mutate(run_id, op)
        except (_Skip, NotFound):
            return

    async def _record_pending_reason(
        self, run_id: str, attempt: int, reason: PendingReason
    ) -> None:
        """Record a reason that applies to the attempt for the first time, as an event."""

        def op(run: OpRun) -> None:
            if run.state is not OpRunState.PENDING or run.current_attempt != attempt:
                raise _Skip()
            # Watchers get the reason with the event that records it.
            run.pending_reason = reason
            run.add_event(
                EventType.INFO.value,
                f"waiting: {reason.message}",
                {"pending_reason": reason.code.value, "message": reason.message},
            )

        try:
            await self._mutate(run_id, op)
        except (_Skip, NotFound):
            return

    def _arm_lost(self, agent: str, last_seen: float, deadline: float | None = None) -> None:
        if deadline is None:
            deadline = last_seen + self.settings.lease_timeout_s + self.settings.grace_s
        self._lost_timers.arm_at(agent, deadline, lambda: self._agent_lost(agent))

    async def _agent_lost(self, agent: str) -> None:
        """Past lease and grace: the agent's attempts fail as AGENT_LOST (and are retried
        by their policy), or end CANCELLED when a cancel was requested."""
        if self._link.is_connected(agent):
            return
        held = [run.id for run in self._held_by(agent)]
        for run_id in held:

            def op(run: OpRun) -> None:
                if not run.on_agent or run.execution_summary.worker_id != agent:
                    raise _Skip()
                message = f"agent {agent} was lost"
                if run.cancel_requested:
                    run.add_event(EventType.CANCELLED.value, f"cancelled; {message}", {})
                else:
                    run.add_event(
                        EventType.FAILED.value,
                        message,
                        {
                            "failure_class": FailureClass.AGENT_LOST.value,
                            "error_message": message,
                        },
                    )

            try:
                await self._mutate(run_id, op)
            except (_Skip, NotFound):
                continue
        log.warning("agent lost", extra={"agent": agent, "runs": len(held)})
