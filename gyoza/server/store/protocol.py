"""``RunStore``: the interface the server's code is typed against.

:class:`~gyoza.server.store.store.Store` (SQLite or PostgreSQL) and
:class:`~gyoza.server.store.memory.InMemoryStore` both satisfy it (mypy checks that in
this module), and ``tests/store/test_store_contract.py`` holds both to the same
behaviour. Code that only needs the store's data (the run controller, the servicers,
the streams) takes a ``RunStore``, so its unit tests run on the in-memory store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry
from gyoza.server.store.records import LogRecord, RunFilter, TopicRecord


class RunStore(Protocol):
    """Definitions, runs with their events, logs and the topic log, durably.

    Guarantees of every implementation: each write is all or nothing and done when its
    call returns; topic offsets increase in commit order (a reader that has every record
    up to offset N never later sees a record below N committed).
    """

    @property
    def url(self) -> str:
        """Where the data lives (the database URL, password included)."""
        ...

    async def close(self) -> None:
        """Finish queued writes and release connections."""
        ...

    # -- definitions ----------------------------------------------------
    async def create_definition(self, d: OpDefinition) -> OpDefinition:
        """Store *d* as the next version of its name; the stored copy."""
        ...

    async def get_definition(self, name: str, version: int | None = None) -> OpDefinition:
        """One version of a definition, the latest when *version* is None; NotFound."""
        ...

    async def list_definitions(
        self, *, name: str | None = None, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpDefinition], str]:
        """A page of definitions and the next page's token (``""`` on the last)."""
        ...

    async def delete_definition(self, name: str, version: int | None = None) -> int:
        """Delete one version, or every version when None; the count; NotFound if none."""
        ...

    # -- runs -----------------------------------------------------------
    async def create_run(self, run: OpRun) -> OpRun:
        """Insert a new run with its attempts and events; AlreadyExists on a taken id or
        request id."""
        ...

    async def get_run(self, run_id: str) -> OpRun:
        """The full run; NotFound."""
        ...

    async def get_run_by_request_id(self, request_id: str) -> OpRun | None:
        """The full run created with *request_id*, or None."""
        ...

    async def list_runs(
        self, f: RunFilter, *, page_size: int = 50, page_token: str = ""
    ) -> tuple[list[OpRun], str]:
        """A page of runs matching *f*, without events, and the next page's token."""
        ...

    async def load_active_runs(self) -> list[OpRun]:
        """Full runs that are PENDING, ASSIGNED or RUNNING, or FAILED with a retry set."""
        ...

    async def save_run(
        self, run: OpRun, new_events: Sequence[tuple[int, EventEntry]]
    ) -> list[TopicRecord]:
        """Persist a run and its new (attempt, event) pairs; the topic records written,
        with their offsets."""
        ...

    async def save_runs(
        self, items: Sequence[tuple[OpRun, Sequence[tuple[int, EventEntry]]]]
    ) -> list[list[TopicRecord]]:
        """:meth:`save_run` for several runs in one transaction."""
        ...

    async def list_events(
        self,
        run_id: str,
        *,
        attempt: int | None = None,
        after: tuple[int, int] = (0, 0),
        limit: int = 500,
    ) -> list[tuple[int, EventEntry]]:
        """(attempt, event) pairs by (attempt, seq), strictly after *after*."""
        ...

    # -- logs and the topic log -----------------------------------------
    async def append_logs(
        self, run_id: str, attempt: int, lines: Sequence[tuple[str, str, datetime]]
    ) -> int:
        """Append (text, stream, t) lines to an attempt's log; the last line's number."""
        ...

    async def read_logs(
        self, run_id: str, attempt: int, *, after_line: int = 0, limit: int = 1000
    ) -> tuple[list[LogRecord], int]:
        """Lines after *after_line*, and how many before the first were dropped."""
        ...

    async def read_topic(
        self, topic: str, *, after_offset: int = 0, limit: int = 500
    ) -> list[TopicRecord]:
        """Records of *topic* after *after_offset*, in offset (commit) order."""
        ...

    async def latest_offset(self) -> int:
        """The newest offset of the topic log; 0 when it is empty."""
        ...


if TYPE_CHECKING:  # mypy proves both stores satisfy the protocol
    from gyoza.server.store.memory import InMemoryStore
    from gyoza.server.store.store import Store

    def _sql(store: Store) -> RunStore:
        return store

    def _memory(store: InMemoryStore) -> RunStore:
        return store
