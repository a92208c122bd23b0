"""The run controller: the only code that changes runs.

It keeps the active runs (not terminal, or failed and waiting for an automatic retry) in
memory, applies one domain operation at a time per run, persists the run and the events
the operation added in one transaction (group-committed with every other write), and only
then publishes the change (watchers, topic subscribers) and updates the scheduler. A
caller that gets a result knows it is durable.

Transport-neutral: the gRPC servicers and agent sessions call it with domain values; it
reaches agents through the :class:`AgentLink` the session registry implements.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from gyoza.models.errors import (
    AlreadyExists,
    FieldViolation,
    GyozaError,
    InvalidInput,
    NotFound,
    OpRunLockedException,
    StaleAttempt,
)
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, EventType, FailureClass, OpRunState
from gyoza.server import metrics
from gyoza.server.hub import Hub
from gyoza.server.scheduler import Placement, Scheduler
from gyoza.server.store import Store

log = logging.getLogger("gyoza.control")

T = TypeVar("T")

_ACTIVE = (OpRunState.ASSIGNED, OpRunState.RUNNING)


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
    """

    heartbeat_interval_s: float = 5.0
    lease_timeout_s: float = 15.0
    grace_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ControlSettings:
        """Settings from ``GYOZA_HEARTBEAT_INTERVAL_S``, ``GYOZA_LEASE_TIMEOUT_S`` and
        ``GYOZA_GRACE_S`` (seconds), defaults for the ones not set."""
        env = os.environ if environ is None else environ
        default = cls()
        return cls(
            heartbeat_interval_s=float(
                env.get("GYOZA_HEARTBEAT_INTERVAL_S", default.heartbeat_interval_s)
            ),
            lease_timeout_s=float(env.get("GYOZA_LEASE_TIMEOUT_S", default.lease_timeout_s)),
            grace_s=float(env.get("GYOZA_GRACE_S", default.grace_s)),
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


@dataclass(frozen=True)
class ReportIn:
    """One numbered report of an agent, transport-neutral.

    ``event_type`` is set for an event, ``lines`` (``(text, stream)``) for log output.
    """

    run_id: str
    attempt: int
    seq: int
    time: datetime
    event_type: EventType | None = None
    message: str = ""
    progress: int = 0
    payload: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] | None = None
    failure_class: FailureClass | None = None
    exit_code: int | None = None
    error_message: str = ""
    duration_ms: int = 0
    lines: tuple[tuple[str, str], ...] = ()
    #: Set when the report is well addressed but malformed: it is refused, and its seq
    #: is consumed so that the attempt's later reports still apply.
    refusal: str = ""


@dataclass(frozen=True)
class AckOut:
    """Every report of the attempt up to ``seq`` is durably recorded."""

    run_id: str
    attempt: int
    seq: int


@dataclass(frozen=True)
class NackOut:
    """A refused message. ``code`` names a gRPC status code (e.g. ``"ABORTED"``)."""

    run_id: str
    attempt: int
    seq: int
    code: str
    reason: str
    message: str
    drop_attempt: bool = False


@dataclass(frozen=True)
class HeldIn:
    """An attempt an agent says it holds when it (re)connects."""

    run_id: str
    attempt: int
    last_seq: int
    finished: bool = False


@dataclass
class Reconciliation:
    """What the server answers to an agent's list of held attempts."""

    resume: list[AckOut] = field(default_factory=list)
    drop: list[NackOut] = field(default_factory=list)
    cancel: list[tuple[str, int, str]] = field(default_factory=list)


class _NullLink:
    def is_connected(self, agent: str) -> bool:
        return False

    def send_assignment(self, agent: str, run: OpRun, placement: Placement) -> bool:
        return False

    def send_cancel(self, agent: str, run_id: str, attempt: int, reason: str) -> bool:
        return False


def _marks(run: OpRun) -> dict[int, int]:
    return {a.attempt: len(a.events) for a in run.attempts}


def _new_events(run: OpRun, marks: dict[int, int]) -> list[tuple[int, EventEntry]]:
    new: list[tuple[int, EventEntry]] = []
    for attempt in run.attempts:
        for entry in attempt.events[marks.get(attempt.attempt, 0) :]:
            new.append((attempt.attempt, entry))
    return new


class RunController:
    """Applies every change to runs, durably, then publishes it.

    Parameters
    ----------
    store : Store
        The durable store.
    hub : Hub
        Fan-out of committed changes.
    settings : ControlSettings | None
        Agent protocol timing.
    """

    def __init__(self, store: Store, hub: Hub, *, settings: ControlSettings | None = None):
        self.store = store
        self.hub = hub
        self.settings = settings or ControlSettings()
        self.scheduler = Scheduler()
        self.link: AgentLink = _NullLink()
        self._runs: dict[str, OpRun] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._retry_timers: dict[str, asyncio.TimerHandle] = {}
        self._lost_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Agents a run must not go back to (they refused its current attempt).
        self._avoid: dict[str, frozenset[str]] = {}
        self._place_scheduled = False
        self._stopped = False

    # ------------------------------------------------------------------
    # Life cycle
    # ------------------------------------------------------------------
    async def start(self) -> None:
        """Rebuild the in-memory view from the store: the queue, the reservations of
        runs that agents hold, and the automatic retry timers."""
        runs = await self.store.load_active_runs()
        loop = asyncio.get_running_loop()
        holders: set[str] = set()
        for run in runs:
            self._runs[run.id] = run
            if run.state is OpRunState.PENDING:
                self._enqueue(run)
            elif run.state in _ACTIVE:
                agent = run.execution_summary.worker_id or ""
                self.scheduler.reserve(
                    agent,
                    run.id,
                    run.current_attempt,
                    run.constraints,
                    tuple(run.execution_summary.gpu_ids),
                )
                holders.add(agent)
            elif run.state is OpRunState.FAILED and run.next_retry_at is not None:
                self._arm_retry(run)
        # Agents that held runs when the server stopped get a lease and a grace period
        # to reconnect, as if they had just gone silent.
        for agent in holders:
            self._arm_lost(agent, loop.time())
        log.info(
            "controller started",
            extra={"active_runs": len(runs), "queued": self.scheduler.queue_depth},
        )
        self._request_place()

    async def stop(self) -> None:
        """Stop timers and wait for background work to finish."""
        self._stopped = True
        for handle in [*self._retry_timers.values(), *self._lost_timers.values()]:
            handle.cancel()
        self._retry_timers.clear()
        self._lost_timers.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------
    # Client operations
    # ------------------------------------------------------------------
    async def create_run(self, run: OpRun) -> OpRun:
        """Store a new run and queue it. Idempotent on ``run.request_id``.

        Raises
        ------
        AlreadyExists
            When the request id was used for a different request.
        """
        if run.request_id:
            existing = await self.store.get_run_by_request_id(run.request_id)
            if existing is not None:
                return self._same_request(existing, run)
        try:
            await self.store.create_run(run)
        except AlreadyExists:
            existing = (
                await self.store.get_run_by_request_id(run.request_id) if run.request_id else None
            )
            if existing is None:
                raise
            return self._same_request(existing, run)
        self._runs[run.id] = run
        self.hub.publish_run(run, _new_events(run, {}))
        self._enqueue(run)
        self._request_place()
        return run

    def _same_request(self, existing: OpRun, run: OpRun) -> OpRun:
        live = self._runs.get(existing.id, existing)
        same = (
            existing.image == run.image
            and existing.inputs == run.inputs
            and existing.op_definition == run.op_definition
            and existing.priority == run.priority
        )
        if not same:
            raise AlreadyExists(
                f"request_id {run.request_id!r} was already used by run {existing.id} "
                "for a different request"
            )
        return live

    async def get_run(self, run_id: str) -> OpRun:
        """The run: active runs from memory, the others from the store.

        Raises
        ------
        NotFound
            When there is no such run.
        """
        run = self._runs.get(run_id)
        if run is not None:
            return run
        return await self.store.get_run(run_id)

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
        if not done and run.state in _ACTIVE:
            agent = run.execution_summary.worker_id or ""
            self.link.send_cancel(agent, run.id, run.current_attempt, reason or "cancelled")
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

    async def set_priority(self, run_id: str, priority: int) -> OpRun:
        """Change a run's priority; a pending run moves in the queue at once.

        Raises
        ------
        InvalidInput
            When the priority is negative.
        OpRunLockedException
            When the run is terminal.
        """

        def op(run: OpRun) -> None:
            if run.is_locked:
                raise OpRunLockedException(
                    f"OpRun {run.id} is in terminal state {run.state.value}; "
                    "its priority cannot change"
                )
            if priority < 0:
                raise InvalidInput([FieldViolation("priority", "must be >= 0")])
            run.set_priority(priority)
            run.add_event(
                EventType.INFO.value, f"priority set to {priority}", {"priority": priority}
            )

        run, _ = await self._mutate(run_id, op)
        self.scheduler.reprioritize(run.id, priority)
        self._request_place()
        return run

    # ------------------------------------------------------------------
    # Agent side
    # ------------------------------------------------------------------
    async def agent_connected(self, agent: str, held: Sequence[HeldIn]) -> Reconciliation:
        """An agent (re)connected: keep what both sides agree it holds, drop what the
        server no longer wants it to run, release what it lost."""
        timer = self._lost_timers.pop(agent, None)
        if timer is not None:
            timer.cancel()
        result = Reconciliation()
        held_keys = set()
        for item in held:
            held_keys.add(item.run_id)
            try:
                run = await self.get_run(item.run_id)
            except NotFound:
                run = None
            ours = (
                run is not None
                and run.current_attempt == item.attempt
                and run.execution_summary.worker_id == agent
            )
            if run is None or not ours:
                result.drop.append(
                    NackOut(
                        item.run_id,
                        item.attempt,
                        0,
                        "ABORTED",
                        StaleAttempt.reason,
                        "the server no longer wants this attempt run",
                        drop_attempt=True,
                    )
                )
                continue
            watermark = run.current_op_attempt.reported_seq
            if run.is_locked and item.last_seq > watermark:
                # The server ended this attempt (e.g. lost past its grace) while the
                # agent still had reports: they can no longer be applied.
                result.drop.append(
                    NackOut(
                        run.id,
                        item.attempt,
                        0,
                        "FAILED_PRECONDITION",
                        OpRunLockedException.reason,
                        f"run is already {run.state.value}",
                        drop_attempt=True,
                    )
                )
                continue
            result.resume.append(AckOut(run.id, item.attempt, watermark))
            if run.state in _ACTIVE:
                if self.scheduler.holder(run.id) != agent:
                    self.scheduler.reserve(
                        agent,
                        run.id,
                        run.current_attempt,
                        run.constraints,
                        tuple(run.execution_summary.gpu_ids),
                    )
                if run.cancel_requested:
                    result.cancel.append((run.id, run.current_attempt, "cancel requested"))
        # Runs the server thinks this agent holds but it does not report: released.
        lost = [
            run.id
            for run in list(self._runs.values())
            if run.state in _ACTIVE
            and run.execution_summary.worker_id == agent
            and run.id not in held_keys
        ]
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
        self._request_place()

    def agent_disconnected(self, agent: str, last_seen: float) -> None:
        """An agent's session ended or went silent (``last_seen`` in loop time): its
        attempts wait for the lease and the grace period, then fail as AGENT_LOST."""
        self.scheduler.set_connected(agent, False)
        self._arm_lost(agent, last_seen)

    async def reply(
        self, agent: str, run_id: str, attempt: int, accepted: bool, reason: str
    ) -> None:
        """An agent accepted or refused an assignment; a refusal releases it."""
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
        self, agent: str, reports: Sequence[ReportIn]
    ) -> tuple[list[AckOut], list[NackOut]]:
        """Apply an agent's reports exactly once, in order, and say what is durable.

        Reports are grouped by attempt; each group is applied under that run's lock and
        committed in one write. A report whose seq is at or below the attempt's
        watermark was applied before and is acknowledged again without effect.
        """
        started = time.perf_counter()
        groups: dict[tuple[str, int], list[ReportIn]] = {}
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
        self, agent: str, key: tuple[str, int], group: list[ReportIn]
    ) -> tuple[AckOut | None, list[NackOut]]:
        run_id, attempt_no = key
        first = group[0]
        async with self._lock(run_id):
            try:
                run = await self.get_run(run_id)
            except NotFound:
                return None, [
                    NackOut(
                        run_id,
                        attempt_no,
                        first.seq,
                        "NOT_FOUND",
                        NotFound.reason,
                        f"no run {run_id}",
                        drop_attempt=True,
                    )
                ]
            if run.current_attempt != attempt_no:
                return None, [
                    NackOut(
                        run_id,
                        attempt_no,
                        first.seq,
                        "ABORTED",
                        StaleAttempt.reason,
                        f"attempt {attempt_no} is not the current attempt "
                        f"({run.current_attempt}) of run {run_id}",
                        drop_attempt=True,
                    )
                ]
            if run.execution_summary.worker_id != agent:
                return None, [
                    NackOut(
                        run_id,
                        attempt_no,
                        first.seq,
                        "PERMISSION_DENIED",
                        "NOT_ASSIGNED_TO_AGENT",
                        f"run {run_id} attempt {attempt_no} is not assigned to agent {agent}",
                        drop_attempt=True,
                    )
                ]
            current = run.current_op_attempt
            marks = _marks(run)
            before = run.state
            watermark_before = current.reported_seq
            nacks: list[NackOut] = []
            lines: list[tuple[str, str, datetime]] = []
            for report in group:
                if report.seq <= current.reported_seq:
                    continue  # applied before: acknowledged again below
                if report.seq != current.reported_seq + 1:
                    break  # a gap: the agent resends from the acknowledged seq
                if report.refusal:
                    current.reported_seq = report.seq
                    nacks.append(
                        NackOut(
                            run_id,
                            attempt_no,
                            report.seq,
                            "INVALID_ARGUMENT",
                            "MALFORMED_REPORT",
                            report.refusal,
                        )
                    )
                    continue
                if report.event_type is None:
                    lines.extend((text, stream, report.time) for text, stream in report.lines)
                    current.reported_seq = report.seq
                    continue
                msg, payload = _event_args(agent, run, report)
                try:
                    run.apply_report(
                        attempt_no,
                        report.seq,
                        report.event_type.value,
                        msg,
                        payload,
                        at=report.time,  # when it happened on the agent
                    )
                except GyozaError as exc:
                    # Refused reports are consumed, not retried forever: the stream goes on.
                    current.reported_seq = report.seq
                    nacks.append(
                        NackOut(
                            run_id,
                            attempt_no,
                            report.seq,
                            "FAILED_PRECONDITION"
                            if isinstance(exc, OpRunLockedException)
                            else "INVALID_ARGUMENT",
                            exc.reason,
                            str(exc),
                        )
                    )
            if current.reported_seq == watermark_before:
                return AckOut(run_id, attempt_no, current.reported_seq), nacks
            try:
                # Both writes are queued before either is awaited, so they normally share
                # one group commit.
                writes = [self._commit(run, marks, before)]
                if lines:
                    writes.append(self._append_logs(run_id, attempt_no, lines))
                await asyncio.gather(*writes)
            except BaseException:
                self._forget(run_id)
                raise
            return AckOut(run_id, attempt_no, current.reported_seq), nacks

    async def _append_logs(
        self, run_id: str, attempt: int, lines: list[tuple[str, str, datetime]]
    ) -> None:
        last = await self.store.append_logs(run_id, attempt, lines)
        self.hub.publish_logs(run_id, attempt, last)

    # ------------------------------------------------------------------
    # Internals: mutation and commit
    # ------------------------------------------------------------------
    def _lock(self, run_id: str) -> asyncio.Lock:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[run_id] = lock
        return lock

    def _forget(self, run_id: str) -> None:
        """Drop a run's in-memory state after a failed write; the store is the truth
        and the next access reloads it."""
        self._runs.pop(run_id, None)

    async def _mutate(self, run_id: str, op: Callable[[OpRun], T]) -> tuple[OpRun, T]:
        async with self._lock(run_id):
            run = await self.get_run(run_id)
            marks = _marks(run)
            before = run.state
            before_retry = run.next_retry_at
            result = op(run)  # the domain refuses before it changes anything
            self._runs[run.id] = run
            try:
                await self._commit(run, marks, before, before_retry)
            except BaseException:
                self._forget(run_id)
                raise
            return run, result

    async def _commit(
        self,
        run: OpRun,
        marks: dict[int, int],
        before: OpRunState,
        before_retry: datetime | None = None,
    ) -> None:
        if (
            run.state is OpRunState.FAILED
            and run.next_retry_at is None
            and before is not OpRunState.FAILED
        ):
            run.schedule_auto_retry()
        new = _new_events(run, marks)
        records = await self.store.save_run(run, new)
        self._after_commit(run, new, before, before_retry)
        self.hub.publish_run(run, new)
        if records:
            self.hub.publish_topic(records)

    def _after_commit(
        self,
        run: OpRun,
        new: Sequence[tuple[int, EventEntry]],
        before: OpRunState,
        before_retry: datetime | None,
    ) -> None:
        state = run.state
        if state is OpRunState.PENDING:
            if before is not OpRunState.PENDING:
                self.scheduler.release(run.id)
                self._enqueue(run)
                self._request_place()
        elif state.is_terminal:
            self.scheduler.dequeue(run.id)
            freed = self.scheduler.release(run.id) is not None
            if state is OpRunState.FAILED and run.next_retry_at is not None:
                if run.next_retry_at != before_retry or run.id not in self._retry_timers:
                    self._arm_retry(run)
            else:
                self._cancel_retry(run.id)
                self._runs.pop(run.id, None)
            if freed:
                self._request_place()

    def _enqueue(self, run: OpRun) -> None:
        self.scheduler.enqueue(
            run.id,
            run.current_attempt,
            run.priority,
            run.created_at,
            run.constraints,
            self._avoid.pop(run.id, frozenset()),
        )

    # ------------------------------------------------------------------
    # Internals: placement
    # ------------------------------------------------------------------
    def _request_place(self) -> None:
        """Coalesce placement requests of one loop iteration into one pass."""
        if self._place_scheduled or self._stopped:
            return
        self._place_scheduled = True
        asyncio.get_running_loop().call_soon(self._place)

    def _place(self) -> None:
        self._place_scheduled = False
        for placement in self.scheduler.place():
            self._spawn(self._assign(placement))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _assign(self, placement: Placement) -> None:
        async with self._lock(placement.run_id):
            run = self._runs.get(placement.run_id)
            if (
                run is None
                or run.state is not OpRunState.PENDING
                or run.current_attempt != placement.attempt
                or not self.link.is_connected(placement.agent)
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
                self._forget(run.id)
                raise
            sent = self.link.send_assignment(placement.agent, run, placement)
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
        async with self._lock(run_id):
            run = self._runs.get(run_id)
            if (
                run is None
                or run.state not in _ACTIVE
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
                self._forget(run_id)
                raise

    # ------------------------------------------------------------------
    # Internals: timers
    # ------------------------------------------------------------------
    def _arm_retry(self, run: OpRun) -> None:
        self._cancel_retry(run.id)
        if run.next_retry_at is None:
            return
        delay = max((run.next_retry_at - datetime.now(run.next_retry_at.tzinfo)).total_seconds(), 0)
        loop = asyncio.get_running_loop()
        self._retry_timers[run.id] = loop.call_later(
            delay, lambda: self._spawn(self._auto_retry(run.id))
        )

    def _cancel_retry(self, run_id: str) -> None:
        handle = self._retry_timers.pop(run_id, None)
        if handle is not None:
            handle.cancel()

    async def _auto_retry(self, run_id: str) -> None:
        self._retry_timers.pop(run_id, None)

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

    def _arm_lost(self, agent: str, last_seen: float) -> None:
        old = self._lost_timers.pop(agent, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        deadline = last_seen + self.settings.lease_timeout_s + self.settings.grace_s
        self._lost_timers[agent] = loop.call_at(
            deadline, lambda: self._spawn(self._agent_lost(agent))
        )

    async def _agent_lost(self, agent: str) -> None:
        """Past lease and grace: the agent's attempts fail as AGENT_LOST (and are retried
        by their policy), or end CANCELLED when a cancel was requested."""
        self._lost_timers.pop(agent, None)
        if self.link.is_connected(agent):
            return
        held = [
            run.id
            for run in list(self._runs.values())
            if run.state in _ACTIVE and run.execution_summary.worker_id == agent
        ]
        for run_id in held:

            def op(run: OpRun) -> None:
                if run.state not in _ACTIVE or run.execution_summary.worker_id != agent:
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


class _Skip(Exception):
    """An operation found nothing to do once it held the run's lock."""


def _event_args(agent: str, run: OpRun, report: ReportIn) -> tuple[str | int, dict[str, Any]]:
    """Turn an agent's report into the domain's ``(msg, payload)``."""
    kind = report.event_type
    payload: dict[str, Any] = dict(report.payload)
    if kind is EventType.PROGRESS:
        if report.message:
            payload.setdefault("message", report.message)
        return report.progress, payload
    if kind is EventType.STARTED:
        payload.setdefault("worker_id", agent)
        payload.setdefault("gpu_ids", list(run.execution_summary.gpu_ids))
    if kind in (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED) and report.duration_ms:
        payload["duration_ms"] = report.duration_ms
    if kind is EventType.COMPLETED:
        payload["outputs"] = dict(report.outputs or {})
    if kind is EventType.FAILED:
        payload["failure_class"] = (report.failure_class or FailureClass.EXIT_CODE).value
        if report.exit_code is not None:
            payload["exit_code"] = report.exit_code
        payload["error_message"] = report.error_message or report.message
    return report.message, payload
