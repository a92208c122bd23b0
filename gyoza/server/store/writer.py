"""The store's single writer thread: group commit of every queued write.

Every write of the process goes through one :class:`Writer`. Its thread takes all the
writes queued while it was busy and applies them in one transaction, so a burst of
writes from many agent streams costs one commit (one fsync) instead of one each.

A write is a function of a Connection, or a :class:`Combinable` write. Within a batch
each write is isolated: if one fails, it alone is rolled back and gets its exception;
the others commit. The common case pays nothing for that: the batch first runs
plainly, and only when a write fails is the transaction rolled back and the batch run
again with a SAVEPOINT around each write, in queue order (on PostgreSQL, hundreds of
savepoints per transaction would also overflow the server's subtransaction cache).
Writes must therefore be repeatable: functions of the connection and of data
snapshotted when they were queued.

Combinable writes of one kind are applied together in that first run: a hundred saves
of different runs become one multi-row statement per table instead of a hundred, which
is what makes group commit pay on PostgreSQL, where every statement is a round trip.
A combinable write names the keys it touches (a run id); it joins an earlier write of
its kind only across writes that touch none of its keys, so the writes of one run
stay in queue order, and a plain write is a barrier nothing moves across.

Each caller's asyncio future is resolved on its own loop (``call_soon_threadsafe``)
after the commit, so an awaited write is durable when the await returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound="Combinable[Any]")

MAX_BATCH = 500
"""Most writes applied in one transaction."""

IDLE_RECONNECT_S = 30.0
"""The writer's connection is checked out afresh after this long unused."""


class Combinable(ABC, Generic[T]):
    """A write that can be applied together with other writes of its class.

    ``keys`` names what it touches; writes whose keys do not meet commute, and the
    writer may move this write back next to an earlier one of its class across them.
    """

    keys: frozenset[Hashable]

    @abstractmethod
    def apply(self, conn: Connection) -> T:
        """Apply this write alone."""

    @classmethod
    def apply_all(cls: type[C], conn: Connection, writes: Sequence[C]) -> list[Any]:
        """Apply several writes of this class, in order; their results, in order.

        The default applies them one by one; override it to batch statements.
        """
        return [w.apply(conn) for w in writes]


Write = Callable[[Connection], T] | Combinable[T]


@dataclass
class _Job(Generic[T]):
    write: Write[T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    ok: bool = False
    result: Any = None
    error: BaseException | None = field(default=None, repr=False)

    def apply(self, conn: Connection) -> Any:
        if isinstance(self.write, Combinable):
            return self.write.apply(conn)
        return self.write(conn)


@dataclass
class _Stage:
    """Jobs applied in one go: one plain write, or combinable writes of one class."""

    kind: type[Combinable[Any]] | None
    jobs: list[_Job[Any]]
    keys: set[Hashable]


class StaleCache(Exception):
    """A write found the database differ from what it had cached.

    The writer rolls the batch back (which tells ``on_rollback`` to drop the caches)
    and applies it again, each write in its savepoint, even a batch of one write.
    """


class _Failed(Exception):
    """A write of a plain (savepoint-free) run failed: the transaction is dropped."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class WriterStats:
    """Counters of a writer, for measurements and metrics.

    ``batches`` is the number of transactions; ``stages`` the number of separate
    applications in them (a combined group counts once).
    """

    batches: int = 0
    writes: int = 0
    stages: int = 0
    retried_batches: int = 0
    largest_batch: int = 0


class Writer:
    """One thread applying queued writes in group-committed transactions.

    Parameters
    ----------
    engine : Engine
        Engine the writer takes its connection from (its transactions should take
        the write lock up front, as ``BEGIN IMMEDIATE`` on SQLite).
    max_batch : int
        Most writes per transaction.
    name : str
        Name of the thread.
    on_rollback : Callable[[], None] | None
        Called on the thread whenever a transaction or a write's savepoint is rolled
        back, so that whatever the writes cache about the database can be dropped.

    Attributes
    ----------
    fence : Callable[[Connection], None] | None
        Run first in every transaction, on its connection; what it raises fails every
        write of the batch (a replica that lost its leadership commits nothing).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = MAX_BATCH,
        name: str = "gyoza-store-writer",
        on_rollback: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._engine = engine
        self._on_rollback = on_rollback
        # Kept open between batches (checked out once, not per batch); dropped when a
        # batch fails, in case the connection is what failed, and after an idle spell
        # (checking it out again runs the pool's pre-ping, if the engine has one).
        self._conn: Connection | None = None
        self._conn_used = 0.0
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.stats = WriterStats()
        self.fence: Callable[[Connection], None] | None = None

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, write: Write[T]) -> asyncio.Future[T]:
        """Queue *write*; the future resolves on the calling loop once it is committed.

        Call from a coroutine. Cancelling the future does not undo the write: it is
        committed (or fails) all the same.

        Raises
        ------
        RuntimeError
            When the writer is closed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._queue.put(_Job(write, future, loop))
        return future

    def close(self) -> None:
        """Refuse new writes, apply those queued, and stop the thread (blocking)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join()

    # ------------------------------------------------------------------
    # The thread
    # ------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch: list[_Job[Any]] = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            self._apply(batch)
        self._drop_connection()

    def _connection(self) -> Connection:
        now = time.monotonic()
        if self._conn is not None and now - self._conn_used > IDLE_RECONNECT_S:
            self._drop_connection()
        if self._conn is None:
            self._conn = self._engine.connect()
        self._conn_used = now
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _rolled_back(self) -> None:
        if self._on_rollback is not None:
            self._on_rollback()

    def _apply(self, batch: list[_Job[Any]]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.writes += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        try:
            try:
                self._combined(batch)
            except _Failed as failed:
                if len(batch) == 1 and not isinstance(failed.error, StaleCache):
                    self._fail(batch[0], failed.error)
                else:
                    stats.retried_batches += 1
                    self._isolated(batch)
        except BaseException as exc:  # the commit or the connection failed: every write did
            # Caught whatever it is: a dead writer thread would leave every later write
            # waiting forever.
            log.warning("store write batch of %d failed: %s", len(batch), exc)
            self._rolled_back()
            self._drop_connection()
            for job in batch:
                if job.error is None:
                    self._fail(job, exc)
        self._settle(batch)

    def _combined(self, batch: list[_Job[Any]]) -> None:
        """Apply the batch in stages, without savepoints; _Failed on the first error."""
        stages = _stages(batch)
        self.stats.stages += len(stages)
        conn = self._connection()
        with _transaction(conn, batch, self._rolled_back, self.fence):
            for stage in stages:
                try:
                    if stage.kind is None or len(stage.jobs) == 1:
                        results = [stage.jobs[0].apply(conn)]
                    else:
                        writes = [job.write for job in stage.jobs]
                        combinable = [w for w in writes if isinstance(w, Combinable)]
                        results = stage.kind.apply_all(conn, combinable)
                except Exception as exc:
                    raise _Failed(exc) from exc
                for job, result in zip(stage.jobs, results, strict=True):
                    job.ok, job.result = True, result

    def _isolated(self, batch: list[_Job[Any]]) -> None:
        """Apply each write in queue order within its own savepoint."""
        conn = self._connection()
        with _transaction(conn, batch, self._rolled_back, self.fence):
            for job in batch:
                try:
                    with conn.begin_nested():
                        result = job.apply(conn)
                    job.ok, job.result = True, result
                except Exception as exc:
                    self._rolled_back()
                    self._fail(job, exc)

    @staticmethod
    def _fail(job: _Job[Any], error: BaseException) -> None:
        job.ok = False
        job.result = None
        job.error = error

    @staticmethod
    def _settle(batch: list[_Job[Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in batch:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, jobs in by_loop.items():
            # A closed loop raises RuntimeError: nobody waits for these any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, jobs)


@contextlib.contextmanager
def _transaction(
    conn: Connection,
    batch: list[_Job[Any]],
    rolled_back: Callable[[], None],
    fence: Callable[[Connection], None] | None = None,
) -> Any:
    """Commit at the end, or roll back (telling *rolled_back*) and mark no job applied.

    *fence* runs first, inside the transaction; what it raises propagates as is (not
    as a write's own failure), so the whole batch fails with it.
    """
    for job in batch:
        job.ok, job.result, job.error = False, None, None
    transaction = conn.begin()
    try:
        if fence is not None:
            fence(conn)
        yield
        transaction.commit()
    except BaseException:
        if transaction.is_active:
            transaction.rollback()
        rolled_back()
        for job in batch:
            job.ok, job.result = False, None
        raise


def _stages(batch: list[_Job[Any]]) -> list[_Stage]:
    """Group combinable jobs of one class, moving none across a job it conflicts with."""
    stages: list[_Stage] = []
    for job in batch:
        write = job.write
        if not isinstance(write, Combinable):
            stages.append(_Stage(None, [job], set()))
            continue
        kind = type(write)
        target = None
        for stage in reversed(stages):
            if stage.kind is kind:
                target = stage
                break
            if stage.kind is None or not stage.keys.isdisjoint(write.keys):
                break
        if target is None:
            stages.append(_Stage(kind, [job], set(write.keys)))
        else:
            target.jobs.append(job)
            target.keys.update(write.keys)
    return stages


def _resolve(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        if job.future.done():  # cancelled by its caller
            continue
        if job.ok:
            job.future.set_result(job.result)
        else:
            job.future.set_exception(job.error or RuntimeError("write failed"))
