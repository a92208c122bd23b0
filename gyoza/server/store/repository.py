"""Synchronous repository: every query of the store, each on a given Connection.

It knows nothing of threads or event loops: :class:`~gyoza.server.store.store.Store`
calls the read methods from worker threads and the write methods from its writer
thread, inside the transaction that thread manages. Writes take rows encoded by
:mod:`gyoza.server.store.rows`; reads return domain objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    String,
    and_,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from gyoza.models.errors import AlreadyExists, NotFound
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, OpRunState
from gyoza.server.store.records import LOG_RETENTION, LogRecord, RunFilter, TopicRecord
from gyoza.server.store.rows import (
    RunWrite,
    definition_from_row,
    encode_json,
    event_from_row,
    group_events,
    log_record_from_row,
    run_from_rows,
    topic_record_from_row,
)
from gyoza.server.store.tables import (
    UTCDateTime,
    op_attempts,
    op_definition_versions,
    op_definitions,
    op_events,
    op_logs,
    op_runs,
    topic_log,
)

ACTIVE_STATES = (OpRunState.PENDING, OpRunState.ASSIGNED, OpRunState.RUNNING)

# Held (per transaction) by every transaction that appends to the topic log on
# PostgreSQL, so that offsets, taken from a sequence at insert time, become visible in
# commit order even with several server replicas: a subscriber resuming after offset N
# then never misses an N-1 that committed late. ("gyozatop" as a number.)
_TOPIC_LOCK = 0x67796F7A61746F70

# Columns a save overwrites; log_lines belongs to append_logs, created_at never changes.
_RUN_UPDATED = [c.name for c in op_runs.columns if c.name not in ("id", "created_at")]
_ATTEMPT_UPDATED = [
    c.name
    for c in op_attempts.columns
    if c.name not in ("run_id", "attempt", "created_at", "log_lines")
]


def _active_condition() -> ColumnElement[bool]:
    return or_(
        op_runs.c.state.in_([s.value for s in ACTIVE_STATES]),
        and_(op_runs.c.next_retry_at.is_not(None), op_runs.c.state == OpRunState.FAILED.value),
    )


def _is_foreign_key_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "23503":  # psycopg
        return True
    return getattr(orig, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_FOREIGNKEY"


class Repository:
    """Queries of the store for one SQL dialect (``"sqlite"`` or ``"postgresql"``).

    Parameters
    ----------
    dialect : str
        Name of the database dialect.
    log_retention : int
        Log lines kept per attempt (the newest).
    """

    def __init__(self, dialect: str, *, log_retention: int = LOG_RETENTION) -> None:
        if dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported dialect {dialect!r}")
        if log_retention < 1:
            raise ValueError("log_retention must be at least 1")
        self.dialect = dialect
        self.log_retention = log_retention
        self._postgres = dialect == "postgresql"
        insert = postgresql.insert if self._postgres else sqlite.insert

        upsert_run = insert(op_runs)
        self._upsert_run: Insert = upsert_run.on_conflict_do_update(
            index_elements=[op_runs.c.id],
            set_={name: upsert_run.excluded[name] for name in _RUN_UPDATED},
        )
        upsert_attempt = insert(op_attempts)
        self._upsert_attempt: Insert = upsert_attempt.on_conflict_do_update(
            index_elements=[op_attempts.c.run_id, op_attempts.c.attempt],
            set_={name: upsert_attempt.excluded[name] for name in _ATTEMPT_UPDATED},
        )
        next_version = insert(op_definition_versions)
        self._next_version = next_version.on_conflict_do_update(
            index_elements=[op_definition_versions.c.name],
            set_={"last_version": op_definition_versions.c.last_version + 1},
        ).returning(op_definition_versions.c.last_version)
        self._insert_topic = topic_log.insert().returning(
            topic_log.c.offset, sort_by_parameter_order=True
        )

    # ------------------------------------------------------------------
    # Definitions
    # ------------------------------------------------------------------

    def create_definition(
        self, conn: Connection, payload: dict[str, Any], created_at: datetime
    ) -> int:
        """Store a new version of ``payload["name"]``; returns the version assigned.

        Versions count up per name and are never reused, even after deletes. The
        payload gets its ``version`` (and is stored with it).
        """
        name = str(payload["name"])
        version = int(
            conn.execute(self._next_version, {"name": name, "last_version": 1}).scalar_one()
        )
        payload = {**payload, "version": version}
        conn.execute(
            op_definitions.insert(),
            {
                "name": name,
                "version": version,
                "payload": encode_json(payload),
                "created_at": created_at,
            },
        )
        return version

    def get_definition(
        self, conn: Connection, name: str, version: int | None = None
    ) -> OpDefinition:
        query = select(op_definitions).where(op_definitions.c.name == name)
        if version is None:
            query = query.order_by(op_definitions.c.version.desc()).limit(1)
        else:
            query = query.where(op_definitions.c.version == version)
        row = conn.execute(query).mappings().first()
        if row is None:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"op definition {name!r} has no {which}")
        return definition_from_row(row)

    def list_latest_definitions(
        self, conn: Connection, *, after_name: str | None, limit: int
    ) -> list[OpDefinition]:
        """The latest version of each name, by name, names after *after_name*."""
        latest = select(
            op_definitions.c.name, func.max(op_definitions.c.version).label("version")
        ).group_by(op_definitions.c.name)
        if after_name is not None:
            latest = latest.where(op_definitions.c.name > after_name)
        latest_sq = latest.order_by(op_definitions.c.name).limit(limit).subquery()
        query = (
            select(op_definitions)
            .join(
                latest_sq,
                and_(
                    op_definitions.c.name == latest_sq.c.name,
                    op_definitions.c.version == latest_sq.c.version,
                ),
            )
            .order_by(op_definitions.c.name)
        )
        return [definition_from_row(r) for r in conn.execute(query).mappings()]

    def list_definition_versions(
        self, conn: Connection, name: str, *, before_version: int | None, limit: int
    ) -> list[OpDefinition]:
        """Versions of *name*, newest first, older than *before_version*."""
        query = select(op_definitions).where(op_definitions.c.name == name)
        if before_version is not None:
            query = query.where(op_definitions.c.version < before_version)
        query = query.order_by(op_definitions.c.version.desc()).limit(limit)
        return [definition_from_row(r) for r in conn.execute(query).mappings()]

    def delete_definition(self, conn: Connection, name: str, version: int | None = None) -> int:
        statement = delete(op_definitions).where(op_definitions.c.name == name)
        if version is not None:
            statement = statement.where(op_definitions.c.version == version)
        deleted = conn.execute(statement).rowcount
        if not deleted:
            which = "any version" if version is None else f"version {version}"
            raise NotFound(f"op definition {name!r} has no {which}")
        return int(deleted)

    # ------------------------------------------------------------------
    # Runs: writes
    # ------------------------------------------------------------------

    def create_run(self, conn: Connection, write: RunWrite) -> list[TopicRecord]:
        """Insert a new run with its attempts and events.

        Raises
        ------
        AlreadyExists
            When a run has this id, or another run this request id.
        """
        if write.request_id is not None:
            taken = conn.execute(
                select(op_runs.c.id).where(op_runs.c.request_id == write.request_id)
            ).first()
            if taken is not None:
                raise AlreadyExists(
                    f"request id {write.request_id!r} was used already by run {taken[0]}"
                )
        try:
            conn.execute(op_runs.insert(), write.run)
        except IntegrityError as exc:
            raise AlreadyExists(f"run {write.run_id} exists already") from exc
        return self._write_children(conn, [write])[0]

    def save_run(self, conn: Connection, write: RunWrite) -> list[TopicRecord]:
        """Upsert a run and all its attempts; insert its new events and topic rows.

        Raises
        ------
        AlreadyExists
            When a new event's (attempt, seq) is stored already, or the request id
            belongs to another run.
        ValueError
            When a new event names an attempt the run lacks.
        """
        return self.save_runs(conn, [write])[0]

    def save_runs(self, conn: Connection, writes: Sequence[RunWrite]) -> list[list[TopicRecord]]:
        """:meth:`save_run` for several writes at once, as if applied in order.

        One statement per table: a run (or attempt) saved twice keeps its last row.
        """
        if not writes:
            return []
        runs = {w.run_id: w.run for w in writes}
        try:
            conn.execute(self._upsert_run, list(runs.values()))
        except IntegrityError as exc:
            requests = ", ".join(repr(w.request_id) for w in writes if w.request_id)
            raise AlreadyExists(f"request id {requests} was used already by another run") from exc
        return self._write_children(conn, writes)

    def _write_children(
        self, conn: Connection, writes: Sequence[RunWrite]
    ) -> list[list[TopicRecord]]:
        attempts = {(a["run_id"], a["attempt"]): a for w in writes for a in w.attempts}
        if attempts:
            conn.execute(self._upsert_attempt, list(attempts.values()))
        events = [e for w in writes for e in w.events]
        if events:
            try:
                conn.execute(op_events.insert(), events)
            except IntegrityError as exc:
                runs = ", ".join(sorted({w.run_id for w in writes if w.events}))
                if _is_foreign_key_violation(exc):
                    raise ValueError(
                        f"run {runs}: a new event names an attempt the run lacks"
                    ) from exc
                keys = ", ".join(f"({e['attempt']}, {e['seq']})" for e in events)
                raise AlreadyExists(
                    f"run {runs}: one of the events (attempt, seq) {keys} is stored already"
                ) from exc
        topic_rows = [t for w in writes for t in w.topic_rows]
        if not topic_rows:
            return [[] for _ in writes]
        if self._postgres:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _TOPIC_LOCK})
        offsets = iter(conn.execute(self._insert_topic, topic_rows).scalars().all())
        return [
            [dataclasses.replace(record, offset=int(next(offsets))) for record in w.topics]
            for w in writes
        ]

    # ------------------------------------------------------------------
    # Runs: reads
    # ------------------------------------------------------------------

    def get_run(self, conn: Connection, run_id: str) -> OpRun | None:
        """The full run (every attempt with its events), or ``None``."""
        row = conn.execute(select(op_runs).where(op_runs.c.id == run_id)).mappings().first()
        if row is None:
            return None
        attempts = conn.execute(
            select(op_attempts)
            .where(op_attempts.c.run_id == run_id)
            .order_by(op_attempts.c.attempt)
        ).mappings()
        events = conn.execute(
            select(op_events)
            .where(op_events.c.run_id == run_id)
            .order_by(op_events.c.attempt, op_events.c.seq)
        ).mappings()
        by_attempt = {attempt: e for (_, attempt), e in group_events(events).items()}
        return run_from_rows(row, list(attempts), by_attempt)

    def get_run_by_request_id(self, conn: Connection, request_id: str) -> OpRun | None:
        run_id = conn.execute(
            select(op_runs.c.id).where(op_runs.c.request_id == request_id)
        ).scalar()
        return None if run_id is None else self.get_run(conn, run_id)

    def list_runs(
        self,
        conn: Connection,
        f: RunFilter,
        *,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[OpRun]:
        """Runs matching *f*, after the (created_at, id) cursor, without their events."""
        conditions: list[ColumnElement[bool]] = []
        if f.states:
            conditions.append(op_runs.c.state.in_([OpRunState(s).value for s in f.states]))
        if f.op_definition is not None:
            conditions.append(op_runs.c.op_definition == f.op_definition)
        if f.image is not None:
            conditions.append(op_runs.c.image == f.image)
        if f.created_after is not None:
            conditions.append(op_runs.c.created_at >= f.created_after)
        if f.created_before is not None:
            conditions.append(op_runs.c.created_at < f.created_before)
        key = tuple_(op_runs.c.created_at, op_runs.c.id)
        if after is not None:
            cursor = tuple_(literal(after[0], UTCDateTime()), literal(after[1], String()))
            conditions.append(key > cursor if f.oldest_first else key < cursor)
        if f.oldest_first:
            order = [op_runs.c.created_at.asc(), op_runs.c.id.asc()]
        else:
            order = [op_runs.c.created_at.desc(), op_runs.c.id.desc()]
        rows = list(
            conn.execute(
                select(op_runs).where(*conditions).order_by(*order).limit(limit)
            ).mappings()
        )
        if not rows:
            return []
        attempts = conn.execute(
            select(op_attempts)
            .where(op_attempts.c.run_id.in_([r["id"] for r in rows]))
            .order_by(op_attempts.c.run_id, op_attempts.c.attempt)
        ).mappings()
        by_run: dict[str, list[Any]] = {}
        for attempt in attempts:
            by_run.setdefault(attempt["run_id"], []).append(attempt)
        return [run_from_rows(r, by_run.get(r["id"], [])) for r in rows]

    def load_active_runs(self, conn: Connection) -> list[OpRun]:
        """Full runs that are PENDING, ASSIGNED, RUNNING, or FAILED awaiting a retry."""
        active = _active_condition()
        rows = list(
            conn.execute(
                select(op_runs).where(active).order_by(op_runs.c.created_at, op_runs.c.id)
            ).mappings()
        )
        if not rows:
            return []
        attempts = conn.execute(
            select(op_attempts)
            .join(op_runs, op_runs.c.id == op_attempts.c.run_id)
            .where(active)
            .order_by(op_attempts.c.run_id, op_attempts.c.attempt)
        ).mappings()
        by_run: dict[str, list[Any]] = {}
        for attempt in attempts:
            by_run.setdefault(attempt["run_id"], []).append(attempt)
        events = group_events(
            conn.execute(
                select(op_events)
                .join(op_runs, op_runs.c.id == op_events.c.run_id)
                .where(active)
                .order_by(op_events.c.run_id, op_events.c.attempt, op_events.c.seq)
            ).mappings()
        )
        runs = []
        for row in rows:
            run_id = row["id"]
            run_attempts = by_run.get(run_id, [])
            run_events = {
                int(a["attempt"]): events.get((run_id, int(a["attempt"])), []) for a in run_attempts
            }
            runs.append(run_from_rows(row, run_attempts, run_events))
        return runs

    def list_events(
        self,
        conn: Connection,
        run_id: str,
        *,
        attempt: int | None = None,
        after: tuple[int, int] = (0, 0),
        limit: int = 500,
    ) -> list[tuple[int, EventEntry]]:
        """Events of a run by (attempt, seq), strictly after the *after* cursor."""
        query = select(op_events).where(op_events.c.run_id == run_id)
        if attempt is not None:
            query = query.where(op_events.c.attempt == attempt)
        if after != (0, 0):
            query = query.where(tuple_(op_events.c.attempt, op_events.c.seq) > tuple_(*after))
        query = query.order_by(op_events.c.attempt, op_events.c.seq).limit(limit)
        return [(int(r["attempt"]), event_from_row(r)) for r in conn.execute(query).mappings()]

    # ------------------------------------------------------------------
    # Logs
    # ------------------------------------------------------------------

    def append_logs(
        self, conn: Connection, run_id: str, attempt: int, rows: Sequence[dict[str, Any]]
    ) -> int:
        """Number and store new lines of an attempt; returns the last line number.

        Only the newest ``log_retention`` lines are kept.

        Raises
        ------
        NotFound
            When the run has no such attempt.
        """
        return self.append_logs_many(conn, [(run_id, attempt, rows)])[0]

    def append_logs_many(
        self, conn: Connection, items: Sequence[tuple[str, int, Sequence[dict[str, Any]]]]
    ) -> list[int]:
        """:meth:`append_logs` for several appends at once, as if applied in order."""
        added: dict[tuple[str, int], int] = {}
        for run_id, attempt, rows in items:
            added[(run_id, attempt)] = added.get((run_id, attempt), 0) + len(rows)
        # Line count before these appends, per attempt: one UPDATE per attempt.
        before: dict[tuple[str, int], int] = {}
        for (run_id, attempt), count in added.items():
            where = and_(op_attempts.c.run_id == run_id, op_attempts.c.attempt == attempt)
            if count:
                last = conn.execute(
                    update(op_attempts)
                    .where(where)
                    .values(log_lines=op_attempts.c.log_lines + count)
                    .returning(op_attempts.c.log_lines)
                ).scalar()
            else:
                last = conn.execute(select(op_attempts.c.log_lines).where(where)).scalar()
            if last is None:
                raise NotFound(f"run {run_id} has no attempt {attempt}")
            before[(run_id, attempt)] = int(last) - count
        ends = {key: before[key] + count for key, count in added.items()}
        numbered: list[dict[str, Any]] = []
        results: list[int] = []
        position = dict(before)
        for run_id, attempt, rows in items:
            key = (run_id, attempt)
            keep_from = ends[key] - self.log_retention + 1
            for row in rows:
                position[key] += 1
                if position[key] >= keep_from:
                    numbered.append({**row, "number": position[key]})
            results.append(position[key])
        if numbered:
            conn.execute(op_logs.insert(), numbered)
        for (run_id, attempt), end in ends.items():
            keep_from = end - self.log_retention + 1
            if before[(run_id, attempt)] > 0 and keep_from > 1:
                conn.execute(
                    delete(op_logs).where(
                        op_logs.c.run_id == run_id,
                        op_logs.c.attempt == attempt,
                        op_logs.c.number < keep_from,
                    )
                )
        return results

    def read_logs(
        self,
        conn: Connection,
        run_id: str,
        attempt: int,
        *,
        after_line: int = 0,
        limit: int = 1000,
    ) -> tuple[list[LogRecord], int]:
        """Lines after *after_line*, and how many before the first were dropped."""
        rows = conn.execute(
            select(op_logs)
            .where(
                op_logs.c.run_id == run_id,
                op_logs.c.attempt == attempt,
                op_logs.c.number > after_line,
            )
            .order_by(op_logs.c.number)
            .limit(limit)
        ).mappings()
        records = [log_record_from_row(r) for r in rows]
        dropped = records[0].number - after_line - 1 if records else 0
        return records, max(dropped, 0)

    # ------------------------------------------------------------------
    # Topic log
    # ------------------------------------------------------------------

    def read_topic(
        self, conn: Connection, topic: str, *, after_offset: int = 0, limit: int = 500
    ) -> list[TopicRecord]:
        rows = conn.execute(
            select(topic_log)
            .where(topic_log.c.topic == topic, topic_log.c.offset > after_offset)
            .order_by(topic_log.c.offset)
            .limit(limit)
        ).mappings()
        return [topic_record_from_row(r) for r in rows]

    def latest_offset(self, conn: Connection) -> int:
        return int(
            conn.execute(select(func.coalesce(func.max(topic_log.c.offset), 0))).scalar_one()
        )
