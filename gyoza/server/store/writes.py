"""The store's frequent writes as writer jobs that the writer may apply together.

Each holds rows encoded when it was queued and names the keys it touches: the run, and
the request id that must stay unique. Writes of one class with disjoint keys are
applied as one multi-row statement per table (see :mod:`gyoza.server.store.writer`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from sqlalchemy import Connection

from gyoza.server.store.records import TopicRecord
from gyoza.server.store.repository import Repository
from gyoza.server.store.rows import RunWrite
from gyoza.server.store.writer import Combinable


def _run_keys(writes: Sequence[RunWrite]) -> frozenset[Hashable]:
    keys: set[Hashable] = set()
    for w in writes:
        keys.add(("run", w.run_id))
        if w.request_id is not None:
            keys.add(("request", w.request_id))
    return frozenset(keys)


class CreateRun(Combinable[list[TopicRecord]]):
    """Insert a new run (its uniqueness checks make it apply alone)."""

    def __init__(self, repository: Repository, write: RunWrite) -> None:
        self.repository = repository
        self.write = write
        self.keys = _run_keys([write])

    def apply(self, conn: Connection) -> list[TopicRecord]:
        return self.repository.create_run(conn, self.write)


class SaveRuns(Combinable[list[list[TopicRecord]]]):
    """Save one or more runs, all or nothing (``save_run`` is the one-run case)."""

    def __init__(self, repository: Repository, writes: Sequence[RunWrite]) -> None:
        self.repository = repository
        self.writes = list(writes)
        self.keys = _run_keys(self.writes)

    def apply(self, conn: Connection) -> list[list[TopicRecord]]:
        return self.repository.save_runs(conn, self.writes)

    @classmethod
    def apply_all(cls, conn: Connection, writes: Sequence[SaveRuns]) -> list[Any]:
        if not writes:
            return []
        flat = [w for save in writes for w in save.writes]
        records = iter(writes[0].repository.save_runs(conn, flat))
        return [[next(records) for _ in save.writes] for save in writes]


class SaveRunWithLogs(Combinable[tuple[list[TopicRecord], int]]):
    """Save a run and append lines to one of its attempts' logs, in one transaction.

    The run row carries the attempt's applied-report watermark, which covers these
    lines: the two commit together or not at all, so a watermark never gets ahead of
    the log lines it acknowledges.
    """

    def __init__(
        self,
        repository: Repository,
        write: RunWrite,
        attempt: int,
        rows: Sequence[tuple[str, str, Any]],
    ) -> None:
        self.repository = repository
        self.write = write
        self.item = (write.run_id, attempt, rows)
        self.keys = _run_keys([write])

    def apply(self, conn: Connection) -> tuple[list[TopicRecord], int]:
        records = self.repository.save_runs(conn, [self.write])[0]
        return records, self.repository.append_logs_many(conn, [self.item])[0]

    @classmethod
    def apply_all(cls, conn: Connection, writes: Sequence[SaveRunWithLogs]) -> list[Any]:
        if not writes:
            return []
        repository = writes[0].repository
        records = repository.save_runs(conn, [w.write for w in writes])
        lasts = repository.append_logs_many(conn, [w.item for w in writes])
        return list(zip(records, lasts, strict=True))


class AppendLogs(Combinable[int]):
    """Append lines to an attempt's log."""

    def __init__(
        self,
        repository: Repository,
        run_id: str,
        attempt: int,
        rows: Sequence[tuple[str, str, Any]],
    ) -> None:
        self.repository = repository
        self.item = (run_id, attempt, rows)
        self.keys = frozenset({("run", run_id)})

    def apply(self, conn: Connection) -> int:
        return self.repository.append_logs_many(conn, [self.item])[0]

    @classmethod
    def apply_all(cls, conn: Connection, writes: Sequence[AppendLogs]) -> list[Any]:
        if not writes:
            return []
        return list(writes[0].repository.append_logs_many(conn, [w.item for w in writes]))
