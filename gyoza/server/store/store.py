"""The async store the server uses: SQLite or PostgreSQL behind one interface.

Reads run in a small pool of worker threads, each on its own connection. Every write
goes through the one :class:`~gyoza.server.store.writer.Writer` thread, which commits
whatever is queued in one transaction (group commit). Domain objects are encoded into
rows on the caller's thread before a write is queued, so later changes to them never
race with the writer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from types import TracebackType
from typing import TypeVar

from sqlalchemy import URL, Connection, Engine

from gyoza.models.errors import NotFound
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry
from gyoza.models.timestamps import utc_now
from gyoza.server.store import paging
from gyoza.server.store.engines import create_engines, normalize_url
from gyoza.server.store.records import (
    LOG_RETENTION,
    AgentDrain,
    LogRecord,
    RunFilter,
    TopicRecord,
)
from gyoza.server.store.repository import Repository
from gyoza.server.store.rows import definition_payload, log_rows
from gyoza.server.store.schema import upgrade
from gyoza.server.store.writer import Writer, WriterStats
from gyoza.server.store.writes import AppendLogs, CreateRun, SaveRuns, SaveRunWithLogs

T = TypeVar("T")

READERS = 4
"""Worker threads (and connections) for reads."""


class Store:
    """Persistent store of definitions, runs, events, logs and the topic log.

    Open with :meth:`open`; close with :meth:`close` (or ``async with``). Every method
    is a coroutine to be awaited on one event loop. Domain errors: ``NotFound``,
    ``AlreadyExists`` (:mod:`gyoza.models.errors`); ``ValueError`` for bad arguments
    such as a malformed page token.
    """

    def __init__(
        self,
        url: URL,
        writer_engine: Engine,
        reader_engine: Engine,
        repository: Repository,
        *,
        readers: int = READERS,
    ) -> None:
        self._url = url
        self._writer_engine = writer_engine
        self._reader_engine = reader_engine
        self._repo = repository
        self._writer = Writer(writer_engine, on_rollback=repository.forget)
        self._readers = ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="gyoza-store-read"
        )
        self._closed = False
        self._writer.start()

    @classmethod
    def open(cls, url: str, *, log_retention: int = LOG_RETENTION, readers: int = READERS) -> Store:
        """Open the database at *url*, migrating its schema to the latest version.

        Parameters
        ----------
        url : str
            ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the
            directory is created) or ``postgresql://user:password@host:port/db``
            (psycopg 3).
        log_retention : int
            Log lines kept per attempt, the newest.
        readers : int
            Threads (and connections) serving reads.

        Raises
        ------
        ValueError
            For an unsupported or malformed URL.
        """
        parsed = normalize_url(url)
        writer_engine, reader_engine = create_engines(parsed, readers=readers)
        try:
            upgrade(writer_engine)
        except BaseException:
            writer_engine.dispose()
            reader_engine.dispose()
            raise
        repository = Repository(writer_engine.dialect.name, log_retention=log_retention)
        return cls(parsed, writer_engine, reader_engine, repository, readers=readers)

    @property
    def url(self) -> str:
        """The database URL, its password masked (for display)."""
        return self._url.render_as_string(hide_password=True)

    def set_fence(self, fence: Callable[[Connection], None] | None) -> None:
        """Run *fence* first in every write transaction (see ``Writer.fence``): what it
        raises, such as ``leadership.FencedOut``, fails the writes of that transaction."""
        self._writer.fence = fence

    @property
    def writer_stats(self) -> WriterStats:
        """Group-commit counters of the writer thread."""
        return self._writer.stats

    async def close(self) -> None:
        """Apply the writes already queued, then release threads and connections."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._writer.close)
        await asyncio.to_thread(self._readers.shutdown, wait=True)
        self._writer_engine.dispose()
        self._reader_engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------

    async def _read(self, query: Callable[[Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, query)

    def _run_read(self, query: Callable[[Connection], T]) -> T:
        with self._reader_engine.connect() as conn:
            return query(conn)

    async def _write(self, write: Callable[[Connection], T]) -> T:
        return await self._writer.submit(write)

    # ------------------------------------------------------------------
    # Definitions
    # ------------------------------------------------------------------

    async def create_definition(self, d: OpDefinition) -> OpDefinition:
        """Store *d* as the next version of its name; returns the stored copy.

        Versions count 1, 2, 3… per name and are never reused, even after the newest
        were deleted (runs keep naming the version they ran). ``created_at`` is now.
        """
        created_at = utc_now()
        payload = definition_payload(d, 0, created_at)
        repo = self._repo
        version = await self._write(lambda c: repo.create_definition(c, payload, created_at))
        stored = OpDefinition.from_dict(payload)
        stored.version = version
        stored.created_at = created_at
        return stored

    async def get_definition(self, name: str, version: int | None = None) -> OpDefinition:
        """One version of a definition, the latest when *version* is None; NotFound."""
        return await self._read(lambda c: self._repo.get_definition(c, name, version))

    async def list_definitions(
        self, *, name: str | None = None, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpDefinition], str]:
        """The latest version of each name by name, or every version of *name*, newest
        first; returns a page and the next page's token (``""`` on the last page)."""
        paging.check_page_size(page_size)
        repo = self._repo
        if name is None:
            after_name = paging.name_position(paging.decode_token(page_token, "defs", ""))
            found = await self._read(
                lambda c: repo.list_latest_definitions(
                    c, after_name=after_name, limit=page_size + 1
                )
            )
            page = found[:page_size]
            token = (
                paging.encode_token("defs", "", [page[-1].name]) if len(found) > page_size else ""
            )
            return page, token
        before = paging.version_position(paging.decode_token(page_token, "def_versions", name))
        found = await self._read(
            lambda c: repo.list_definition_versions(
                c, name, before_version=before, limit=page_size + 1
            )
        )
        page = found[:page_size]
        token = (
            paging.encode_token("def_versions", name, [page[-1].version])
            if len(found) > page_size
            else ""
        )
        return page, token

    async def delete_definition(self, name: str, version: int | None = None) -> int:
        """Delete one version, or every version when None; the count; NotFound if none."""
        repo = self._repo
        return await self._write(lambda c: repo.delete_definition(c, name, version))

    # ------------------------------------------------------------------
    # Runs
    # ------------------------------------------------------------------

    async def create_run(self, run: OpRun) -> OpRun:
        """Insert a new run with its attempts and events (and their topic rows).

        Raises
        ------
        AlreadyExists
            When ``run.request_id`` (or ``run.id``) is taken already.
        """
        write = self._repo.encode_run(run, [(a.attempt, e) for a in run.attempts for e in a.events])
        await self._writer.submit(CreateRun(self._repo, write))
        return run

    async def get_run(self, run_id: str) -> OpRun:
        """The full run: every attempt with its events. NotFound."""
        run = await self._read(lambda c: self._repo.get_run(c, run_id))
        if run is None:
            raise NotFound(f"run {run_id} does not exist")
        return run

    async def get_run_by_request_id(self, request_id: str) -> OpRun | None:
        """The full run created with *request_id*, or None."""
        return await self._read(lambda c: self._repo.get_run_by_request_id(c, request_id))

    async def list_runs(
        self, f: RunFilter, *, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpRun], str]:
        """Runs matching *f*, newest first unless ``f.oldest_first``, without events.

        Keyset pagination on (created_at, id): a token stays correct while runs are
        created (none is repeated or skipped among those the listing had reached).

        Raises
        ------
        ValueError
            For a bad page size or token, or a token from other filters.
        """
        paging.check_page_size(page_size)
        paging.check_run_filter(f)
        fingerprint = paging.run_filter_fingerprint(f)
        after = paging.run_position(paging.decode_token(page_token, "runs", fingerprint))
        found = await self._read(
            lambda c: self._repo.list_runs(c, f, after=after, limit=page_size + 1)
        )
        page = found[:page_size]
        token = ""
        if len(found) > page_size:
            last = page[-1]
            token = paging.encode_token("runs", fingerprint, [last.created_at.isoformat(), last.id])
        return page, token

    async def record_agents_seen(self, seen: Mapping[str, datetime]) -> None:
        """Remember when agents were last heard from (a time never goes back)."""
        snapshot = dict(seen)
        if snapshot:
            await self._write(lambda c: self._repo.record_agents_seen(c, snapshot))

    async def open_reconnect_windows(
        self, fallback: Mapping[str, datetime], now: datetime
    ) -> dict[str, tuple[datetime, datetime]]:
        """After a restart: each agent's (last heard, start of its reconnect window).

        A window begins at *now*, once per absence: a later restart keeps the start
        an earlier one recorded. Agents never recorded count as heard at *fallback*.
        """
        wanted = dict(fallback)
        return await self._write(lambda c: self._repo.open_reconnect_windows(c, wanted, now))

    async def agents_last_seen(self, names: Sequence[str]) -> dict[str, datetime]:
        """When these agents were last heard from, as recorded (unknown ones: left out)."""
        wanted = list(names)
        return await self._read(lambda c: self._repo.agents_last_seen(c, wanted))

    async def event_counts(self, run_ids: Sequence[str]) -> dict[str, int]:
        """Each run's number of events over all its attempts: its event sequence
        (``list_runs`` loads runs without their events)."""
        ids = list(run_ids)
        return await self._read(lambda c: self._repo.event_counts(c, ids))

    async def load_active_runs(self) -> list[OpRun]:
        """Full runs that are PENDING, ASSIGNED or RUNNING, or FAILED with a retry set."""
        return await self._read(self._repo.load_active_runs)

    async def save_run(
        self, run: OpRun, new_events: Sequence[tuple[int, EventEntry]]
    ) -> list[TopicRecord]:
        """Persist a run: its row, every attempt, and the new (attempt, event) pairs.

        With a topic in the run's event delivery, each new event is also appended to
        the topic log; the records are returned with their offsets. All or nothing.

        Raises
        ------
        AlreadyExists
            When a new event is stored already, or the request id is another run's.
        ValueError
            When a new event names an attempt the run lacks.
        """
        write = self._repo.encode_run(run, new_events)
        saved = await self._writer.submit(SaveRuns(self._repo, [write]))
        return saved[0]

    async def save_run_with_logs(
        self,
        run: OpRun,
        new_events: Sequence[tuple[int, EventEntry]],
        attempt: int,
        lines: Sequence[tuple[str, str, datetime]],
    ) -> tuple[list[TopicRecord], int]:
        """:meth:`save_run` and :meth:`append_logs` of one attempt, in one transaction.

        Returns the topic records and the last log line number. All or nothing: the
        run's applied-report watermark is never committed without the lines it covers.

        Raises
        ------
        AlreadyExists, ValueError
            As :meth:`save_run`; ValueError also for an unknown log stream.
        """
        write = self._repo.encode_run(run, new_events)
        rows = log_rows(run.id, attempt, lines, stamp=self._repo.stamp)
        return await self._writer.submit(SaveRunWithLogs(self._repo, write, attempt, rows))

    async def save_runs(
        self, items: Sequence[tuple[OpRun, Sequence[tuple[int, EventEntry]]]]
    ) -> list[list[TopicRecord]]:
        """:meth:`save_run` for several runs in one transaction: all or nothing."""
        writes = [self._repo.encode_run(run, events) for run, events in items]
        if not writes:
            return []
        return await self._writer.submit(SaveRuns(self._repo, writes))

    async def list_events(
        self,
        run_id: str,
        *,
        attempt: int | None = None,
        after: tuple[int, int] = (0, 0),
        limit: int = 500,
    ) -> list[tuple[int, EventEntry]]:
        """(attempt, event) pairs by (attempt, seq), strictly after *after*.

        An unknown run has no events (an empty list, not NotFound).
        """
        return await self._read(
            lambda c: self._repo.list_events(c, run_id, attempt=attempt, after=after, limit=limit)
        )

    async def delete_run(self, run_id: str) -> None:
        """Delete a finished run with its attempts, events, log lines and topic records,
        in one transaction.

        Raises
        ------
        NotFound
            When there is no such run.
        RunNotFinished
            When the run is not COMPLETED, FAILED or CANCELLED, or waits for an
            automatic retry.
        """
        repo = self._repo
        await self._write(lambda c: repo.delete_run(c, run_id))

    async def delete_finished_before(
        self, before: datetime, *, limit: int = 100, exclude: Collection[str] = ()
    ) -> list[str]:
        """Delete up to *limit* finished runs (as :meth:`delete_run` deletes them) whose
        last change is older than *before*, oldest first, in one transaction; returns
        their ids. Runs in *exclude* are kept. Call again until it returns fewer than
        *limit*."""
        repo = self._repo
        return await self._write(lambda c: repo.delete_finished_before(c, before, limit, exclude))

    # ------------------------------------------------------------------
    # Logs
    # ------------------------------------------------------------------

    async def append_logs(
        self, run_id: str, attempt: int, lines: Sequence[tuple[str, str, datetime]]
    ) -> int:
        """Append (text, stream, t) lines to an attempt's log; returns the last number.

        Lines are numbered on from the attempt's previous last line; only the newest
        ``log_retention`` are kept.

        Raises
        ------
        NotFound
            When the run has no such attempt.
        ValueError
            For a stream other than ``"stdout"`` and ``"stderr"``.
        """
        rows = log_rows(run_id, attempt, lines, stamp=self._repo.stamp)
        return await self._writer.submit(AppendLogs(self._repo, run_id, attempt, rows))

    async def read_logs(
        self, run_id: str, attempt: int, *, after_line: int = 0, limit: int = 1000
    ) -> tuple[list[LogRecord], int]:
        """Lines after *after_line*, and how many before the first were dropped."""
        return await self._read(
            lambda c: self._repo.read_logs(c, run_id, attempt, after_line=after_line, limit=limit)
        )

    # ------------------------------------------------------------------
    # Topic log
    # ------------------------------------------------------------------

    async def read_topic(
        self, topic: str, *, after_offset: int = 0, limit: int = 500
    ) -> list[TopicRecord]:
        """Records of *topic* after *after_offset*, in offset (commit) order."""
        return await self._read(
            lambda c: self._repo.read_topic(c, topic, after_offset=after_offset, limit=limit)
        )

    async def latest_offset(self) -> int:
        """The newest offset of the topic log (all topics); 0 when it is empty."""
        return await self._read(self._repo.latest_offset)

    # ------------------------------------------------------------------
    # Agent drains
    # ------------------------------------------------------------------

    async def list_drains(self) -> list[AgentDrain]:
        """Every agent an operator drained and did not undrain, by name."""
        return await self._read(self._repo.list_drains)

    async def set_drain(self, drain: AgentDrain) -> None:
        """Record that an agent is drained (durable once this returns)."""
        repo = self._repo
        await self._write(lambda c: repo.set_drain(c, drain))

    async def clear_drain(self, name: str) -> bool:
        """Forget an agent's drain; False when it was not drained."""
        repo = self._repo
        return await self._write(lambda c: repo.clear_drain(c, name))
