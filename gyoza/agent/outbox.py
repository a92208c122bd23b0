"""The agent's on-disk outbox: what it holds and what the server has not acknowledged.

One SQLite file in the state directory. It remembers, for every attempt the agent holds,
the Assignment (so the attempt survives an agent restart), the last report ``seq``
written, the executor's cursor, when the attempt started and whether it has ended; and
every report the server has not acknowledged yet.

Guarantees
----------
* A report is durable before anyone can send it: :meth:`Outbox.store` returns, and
  subscribers see the report, only after its transaction is committed.
* Seqs are 1, 2, 3... per ``(run_id, attempt)``, assigned in call order at store time and
  never reused, even after every report was acknowledged and deleted (``last_seq`` is
  kept with the attempt).
* The cursor and the start time are written in the same transaction as their report.
* At most one terminal event per attempt: reports stored after it are dropped.
* :meth:`pending` gives the unacknowledged reports in the order they were stored, across
  restarts. A cumulative ack drops every report up to its seq; once the terminal event
  is acknowledged the attempt is forgotten. The ack's deletes on disk wait up to
  :data:`ACK_DEFER_S` to share the next report's transaction (a crash meanwhile only
  resends reports the server already has, which it drops).

Durability
----------
WAL with ``synchronous=FULL``: every commit syncs the WAL, so a committed report survives
a power cut, not only a crash of the process. NORMAL would survive ``kill -9`` but could
lose the last commits on power loss; a report the server already has would then be lost
here and its seq reused for a *different* report, which the server would acknowledge as a
duplicate and drop. The cost of FULL is one fsync per commit, and writes are group
committed: a worker thread writes everything queued since the previous commit in one
transaction, so a burst of reports costs one fsync. (NORMAL stays available for simulated
fleets, where hundreds of outboxes share one disk.)

Concurrency: the outbox belongs to one event loop. Its state lives in memory and SQLite
is written behind it, by at most one transaction at a time. With FULL the transaction
runs in a thread of the loop's default executor, so the loop never waits for an fsync.
With NORMAL a WAL commit does not touch the disk's sync path, so it is written on the
loop itself: the thread hop would cost more than the write (about 40% more reports per
second for a simulated fleet of 200 agents in one process).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import resources_pb2

log = logging.getLogger(__name__)

#: Name of the outbox file in the state directory.
OUTBOX_FILE = "outbox.sqlite3"

ACK_DEFER_S = 0.05
"""Longest an acknowledgement's deletes wait to share a later transaction."""

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    assignment BLOB NOT NULL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    acked_seq INTEGER NOT NULL DEFAULT 0,
    cursor INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    terminal_seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, attempt)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS reports_by_attempt ON reports (run_id, attempt, seq);
"""

#: Reports of one transaction are written with executemany; a statement is SQL + params.
_Statement = tuple[str, tuple[Any, ...]]
AttemptKey = tuple[str, int]


class OutboxError(RuntimeError):
    """Raised when the outbox cannot be used (wrong agent, failed write, closed)."""


@dataclass(frozen=True)
class HeldRecord:
    """An attempt the outbox holds, as the Hello lists it.

    Parameters
    ----------
    run_id : str
        Identifier of the run.
    attempt : int
        Attempt number.
    last_seq : int
        Last report seq durably written (acknowledged or not).
    finished : bool
        True once its terminal event is durably written: only reports remain to deliver.
    """

    run_id: str
    attempt: int
    last_seq: int
    finished: bool


@dataclass(order=True)
class _Stored:
    order: int
    seq: int = field(compare=False)
    report: pb.Report = field(compare=False)


@dataclass
class _Attempt:
    """In-memory state of one held attempt (the database follows it)."""

    run_id: str
    attempt: int
    assignment: bytes
    assigned_seq: int = 0  # last seq handed out (maybe not committed yet)
    durable_seq: int = 0  # last seq committed
    acked_seq: int = 0
    cursor: int = 0
    started_at: datetime | None = None
    terminal_seq: int = 0  # seq of the terminal event once stored; 0 before
    reports: deque[_Stored] = field(default_factory=deque)  # committed, unacked

    @property
    def key(self) -> AttemptKey:
        return (self.run_id, self.attempt)

    @property
    def finished(self) -> bool:
        """Terminal event durably written."""
        return 0 < self.terminal_seq <= self.durable_seq


class Outbox:
    """The durable outbox of one agent; open it with :meth:`open`.

    Parameters
    ----------
    path : Path
        The SQLite file.
    synchronous : str
        ``"FULL"`` or ``"NORMAL"`` (see the module's notes on durability).
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous.upper()
        self._db: sqlite3.Connection | None = None
        self._attempts: dict[AttemptKey, _Attempt] = {}
        self._next_order = 1
        # Group commit: statements queued since the last transaction, with the futures
        # of the callers waiting for them and the reports that become sendable.
        self._queued: list[_Statement] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._committing: list[tuple[_Attempt, _Stored]] = []
        self._writer: asyncio.Task[None] | None = None
        # Ack deletes wait up to ACK_DEFER_S for the next transaction (a report's), so
        # that a busy outbox commits them with it; a timer writes them otherwise.
        self._deferred: list[_Statement] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None
        self._closing = False
        self._subscribers: list[Callable[[pb.Report], None]] = []
        self._on_failure: list[Callable[[BaseException], None]] = []
        self._emptied = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, agent_name: str, synchronous: str = "FULL") -> Outbox:
        """Open (or create) the outbox file and load what it holds.

        Raises
        ------
        OutboxError
            When the file belongs to another agent name and still holds attempts.
        """
        outbox = cls(path, synchronous=synchronous)
        await asyncio.to_thread(outbox._load, agent_name)
        outbox._update_emptied()
        return outbox

    def _load(self, agent_name: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            attempts = db.execute(
                "SELECT run_id, attempt, assignment, last_seq, acked_seq, cursor, started_at,"
                " terminal_seq FROM attempts"
            ).fetchall()
            row = db.execute("SELECT value FROM meta WHERE key = 'agent_name'").fetchone()
            if row is not None and row[0] != agent_name and attempts:
                raise OutboxError(
                    f"the outbox {self.path} belongs to agent {row[0]!r}, which still holds "
                    f"{len(attempts)} attempt(s); start that agent, or give this one "
                    "another state directory"
                )
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('agent_name', ?)",
                (agent_name,),
            )
            for run_id, attempt, assignment, last_seq, acked, cursor, started, term in attempts:
                self._attempts[(run_id, attempt)] = _Attempt(
                    run_id=run_id,
                    attempt=attempt,
                    assignment=bytes(assignment),
                    assigned_seq=last_seq,
                    durable_seq=last_seq,
                    acked_seq=acked,
                    cursor=cursor,
                    started_at=None if started is None else datetime.fromisoformat(started),
                    terminal_seq=term,
                )
            for order, run_id, attempt, seq, body in db.execute(
                "SELECT id, run_id, attempt, seq, body FROM reports ORDER BY id"
            ):
                held = self._attempts.get((run_id, attempt))
                if held is None or seq <= held.acked_seq:
                    continue
                held.reports.append(_Stored(order, seq, pb.Report.FromString(body)))
            order_row = db.execute("SELECT MAX(id) FROM reports").fetchone()
            if order_row is not None and order_row[0] is not None:
                self._next_order = max(self._next_order, order_row[0] + 1)
            # Forget what was acknowledged to the end just before a crash.
            for held in list(self._attempts.values()):
                if held.finished and held.acked_seq >= held.terminal_seq:
                    self._drop(held)
                    db.execute(*_delete_attempt(held.key))
                    db.execute(*_delete_reports(held.key, None))
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Write what is queued, then close the file. Reports stored from now on are
        dropped."""
        self._closing = True
        await self.flush()
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(db.close)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (deferred acks included)."""
        if self._deferred and self._db is not None and self._error is None:
            self._queue([])
        while self._writer is not None:
            await asyncio.shield(self._writer)

    # -- what the agent holds ---------------------------------------------------------

    def held(self) -> list[HeldRecord]:
        """Every attempt held, in a stable order (for the Hello)."""
        return [
            HeldRecord(a.run_id, a.attempt, a.durable_seq, a.finished)
            for a in sorted(self._attempts.values(), key=lambda a: a.key)
        ]

    def holds(self, run_id: str, attempt: int) -> bool:
        """True while the attempt is held."""
        return (run_id, attempt) in self._attempts

    def unfinished(self) -> list[pb.Assignment]:
        """Assignments of the held attempts whose terminal event is not written."""
        return [
            pb.Assignment.FromString(a.assignment)
            for a in sorted(self._attempts.values(), key=lambda a: a.key)
            if a.terminal_seq == 0
        ]

    def is_finished(self, run_id: str, attempt: int) -> bool:
        """True when the attempt's terminal event is stored (or it is not held)."""
        held = self._attempts.get((run_id, attempt))
        return held is None or held.terminal_seq > 0

    def cursor(self, run_id: str, attempt: int) -> int:
        """The last executor cursor stored for the attempt (0 when none)."""
        held = self._attempts.get((run_id, attempt))
        return 0 if held is None else held.cursor

    def started_at(self, run_id: str, attempt: int) -> datetime | None:
        """When the attempt's STARTED event was stored."""
        held = self._attempts.get((run_id, attempt))
        return None if held is None else held.started_at

    def last_seq(self, run_id: str, attempt: int) -> int:
        """The last seq handed out for the attempt (0 when none or not held)."""
        held = self._attempts.get((run_id, attempt))
        return 0 if held is None else held.assigned_seq

    @property
    def empty(self) -> bool:
        """True when no attempt is held."""
        return not self._attempts

    async def wait_empty(self) -> None:
        """Return once no attempt is held (each ended and was fully acknowledged)."""
        await self._emptied.wait()

    async def hold(self, assignment: pb.Assignment) -> bool:
        """Remember a new attempt durably.

        Returns
        -------
        bool
            False when the attempt was already held (nothing changes).
        """
        key = (assignment.run_id, assignment.attempt)
        if key in self._attempts:
            return False
        body = assignment.SerializeToString()
        self._attempts[key] = _Attempt(assignment.run_id, assignment.attempt, body)
        self._update_emptied()
        await self._commit(
            [
                (
                    "INSERT OR REPLACE INTO attempts (run_id, attempt, assignment)"
                    " VALUES (?, ?, ?)",
                    (key[0], key[1], body),
                )
            ]
        )
        return True

    def forget(self, run_id: str, attempt: int) -> None:
        """Drop an attempt and its reports (it is no longer this agent's)."""
        held = self._attempts.get((run_id, attempt))
        if held is None:
            return
        self._drop(held)
        self._queue([_delete_attempt(held.key), _delete_reports(held.key, None)])

    # -- reports ---------------------------------------------------------------------

    async def store(
        self,
        report: pb.Report,
        *,
        cursor: int | None = None,
        terminal: bool = False,
    ) -> pb.Report | None:
        """Number a report of a held attempt and write it durably.

        Parameters
        ----------
        report : pb.Report
            The report, with ``run_id``, ``attempt``, ``time`` and a body; its ``seq`` is
            set here.
        cursor : int | None
            Executor resume point to store with it (``None`` keeps the previous one).
        terminal : bool
            True for COMPLETED, FAILED and CANCELLED: nothing is stored after it.

        Returns
        -------
        pb.Report | None
            The numbered report once committed; ``None`` when it was dropped: the attempt
            is not held or already ended, or the outbox is closing (an executor that
            reports while the agent stops; it resumes from the durable cursor later).

        Raises
        ------
        OutboxError
            When the outbox failed to write.
        """
        if self._error is not None:
            raise OutboxError("the outbox failed to write") from self._error
        if self._closing:
            log.debug("outbox: closing; dropping a report of %s/%s", report.run_id, report.attempt)
            return None
        held = self._attempts.get((report.run_id, report.attempt))
        if held is None or held.terminal_seq > 0:
            log.debug(
                "outbox: dropping a report of %s/%s: %s",
                report.run_id,
                report.attempt,
                "not held" if held is None else "attempt already ended",
            )
            return None
        held.assigned_seq += 1
        report.seq = held.assigned_seq
        if cursor is not None:
            held.cursor = cursor
        started_at: str | None = None
        if (
            held.started_at is None
            and report.HasField("event")
            and report.event.type == resources_pb2.EVENT_TYPE_STARTED
        ):
            held.started_at = report.time.ToDatetime(tzinfo=UTC)
            started_at = held.started_at.isoformat()
        if terminal:
            held.terminal_seq = report.seq
        stored = _Stored(self._next_order, report.seq, report)
        self._next_order += 1
        await self._commit(
            [
                (
                    "INSERT INTO reports (id, run_id, attempt, seq, body) VALUES (?, ?, ?, ?, ?)",
                    (
                        stored.order,
                        held.run_id,
                        held.attempt,
                        report.seq,
                        report.SerializeToString(),
                    ),
                ),
                (
                    "UPDATE attempts SET last_seq = MAX(last_seq, ?), cursor = ?,"
                    " started_at = COALESCE(started_at, ?), terminal_seq = ?"
                    " WHERE run_id = ? AND attempt = ?",
                    (
                        report.seq,
                        held.cursor,
                        started_at,
                        held.terminal_seq,
                        held.run_id,
                        held.attempt,
                    ),
                ),
            ],
            (held, stored),
        )
        return report

    @property
    def depth(self) -> int:
        """How many committed reports are not acknowledged yet."""
        return sum(len(a.reports) for a in self._attempts.values())

    def pending(self) -> list[pb.Report]:
        """Every committed, unacknowledged report, in the order they were stored."""
        streams: list[Iterable[_Stored]] = [a.reports for a in self._attempts.values()]
        return [stored.report for stored in heapq.merge(*streams)]

    def is_pending(self, report: pb.Report) -> bool:
        """True while *report* is held and not acknowledged (worth sending)."""
        held = self._attempts.get((report.run_id, report.attempt))
        return held is not None and report.seq > held.acked_seq

    def ack(self, run_id: str, attempt: int, seq: int) -> None:
        """The server has recorded every report of the attempt up to *seq*.

        Drops those reports; forgets the attempt once its terminal event is covered. A
        seq beyond what this outbox handed out (reports lost to a power cut after they
        were sent) moves the numbering past it, so that no seq is ever reused.
        """
        held = self._attempts.get((run_id, attempt))
        if held is None or seq <= held.acked_seq:
            return
        held.acked_seq = seq
        while held.reports and held.reports[0].seq <= seq:
            held.reports.popleft()
        if held.terminal_seq and seq >= held.terminal_seq:
            self._drop(held)
            self._defer([_delete_attempt(held.key), _delete_reports(held.key, None)])
            return
        statements = [
            _delete_reports(held.key, seq),
            (
                "UPDATE attempts SET acked_seq = MAX(acked_seq, ?), last_seq = MAX(last_seq, ?)"
                " WHERE run_id = ? AND attempt = ?",
                (seq, seq, run_id, attempt),
            ),
        ]
        if seq > held.assigned_seq:
            log.warning(
                "outbox: the server has seq %d of %s/%s, beyond the %d written here",
                seq,
                run_id,
                attempt,
                held.assigned_seq,
            )
            held.assigned_seq = held.durable_seq = seq
        self._defer(statements)

    def subscribe(self, callback: Callable[[pb.Report], None]) -> Callable[[], None]:
        """Call *callback* with each report as soon as it is committed; returns the
        function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call *callback* once when a write fails (the outbox is then unusable)."""
        self._on_failure.append(callback)

    # -- group commit ----------------------------------------------------------------

    def _drop(self, held: _Attempt) -> None:
        if self._attempts.get(held.key) is held:
            del self._attempts[held.key]
        held.reports.clear()
        self._update_emptied()

    def _update_emptied(self) -> None:
        if self._attempts:
            self._emptied.clear()
        else:
            self._emptied.set()

    def _defer(self, statements: Sequence[_Statement]) -> None:
        """Queue ack statements with the next transaction, at most :data:`ACK_DEFER_S`
        from now. Losing them to a crash only makes the agent resend reports the server
        already has, which it drops."""
        if self._error is not None:
            raise OutboxError("the outbox failed to write") from self._error
        if self._db is None:
            raise OutboxError("the outbox is closed")
        self._deferred.extend(statements)
        if self._deferred_timer is None:
            self._deferred_timer = asyncio.get_running_loop().call_later(
                ACK_DEFER_S, self._write_deferred
            )

    def _write_deferred(self) -> None:
        self._deferred_timer = None
        if self._deferred and self._db is not None and self._error is None:
            self._queue([])

    def _queue(self, statements: Sequence[_Statement]) -> None:
        if self._error is not None:
            raise OutboxError("the outbox failed to write") from self._error
        if self._db is None:
            raise OutboxError("the outbox is closed")
        if self._deferred:
            self._queued.extend(self._deferred)  # issued first: keep their order
            self._deferred = []
            if self._deferred_timer is not None:
                self._deferred_timer.cancel()
                self._deferred_timer = None
        self._queued.extend(statements)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _commit(
        self, statements: Sequence[_Statement], stored: tuple[_Attempt, _Stored] | None = None
    ) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(statements)
        self._waiters.append(waiter)
        if stored is not None:
            self._committing.append(stored)
        # Shielded: a caller that is cancelled does not undo its write, which keeps the
        # seq it was given.
        await asyncio.shield(waiter)

    async def _write_loop(self) -> None:
        try:
            while self._queued:
                statements, self._queued = self._queued, []
                waiters, self._waiters = self._waiters, []
                committing, self._committing = self._committing, []
                try:
                    if self._synchronous == "FULL":
                        await asyncio.to_thread(self._write, statements)
                    else:
                        self._write(statements)  # no fsync: cheaper than a thread hop
                except Exception as exc:
                    self._fail(exc, waiters)
                    return
                for held, stored in committing:
                    held.durable_seq = max(held.durable_seq, stored.seq)
                    if self._attempts.get(held.key) is held and stored.seq > held.acked_seq:
                        held.reports.append(stored)
                        for callback in list(self._subscribers):
                            callback(stored.report)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._writer = None

    def _write(self, statements: list[_Statement]) -> None:
        db = self._db
        if db is None:
            raise OutboxError("the outbox is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _fail(self, exc: Exception, waiters: list[asyncio.Future[None]]) -> None:
        log.error("outbox: write failed: %s", exc)
        self._error = exc
        error = OutboxError(f"the outbox failed to write: {exc}")
        for waiter in [*waiters, *self._waiters]:
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters = []
        self._queued = []
        self._committing = []
        for callback in self._on_failure:
            callback(exc)


def _delete_attempt(key: AttemptKey) -> _Statement:
    return ("DELETE FROM attempts WHERE run_id = ? AND attempt = ?", key)


def _delete_reports(key: AttemptKey, up_to: int | None) -> _Statement:
    if up_to is None:
        return ("DELETE FROM reports WHERE run_id = ? AND attempt = ?", key)
    return ("DELETE FROM reports WHERE run_id = ? AND attempt = ? AND seq <= ?", (*key, up_to))
