"""Synchronous repository: every query of the store, each on a given Connection.

It knows nothing of threads or event loops: :class:`~gyoza.server.store.store.Store`
calls the read methods from worker threads and the write methods from its writer
thread, inside the transaction that thread manages. Writes take rows encoded by
:mod:`gyoza.server.store.rows`; reads return domain objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    and_,
    delete,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite

from gyoza.models.errors import AlreadyExists, NotFound, RunNotFinished
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import (
    LIVE_STATES,
    RETRY_WAIT_STATES,
    TERMINAL_STATES,
    EventEntry,
    OpRunState,
)
from gyoza.server.store.records import (
    LOG_RETENTION,
    AgentDrain,
    LogRecord,
    RunFilter,
    TopicRecord,
)
from gyoza.server.store.rows import (
    ATTEMPT_COLUMNS,
    EVENT_COLUMNS,
    LOG_COLUMNS,
    RUN_COLUMNS,
    TOPIC_COLUMNS,
    JsonMemo,
    RunWrite,
    Stamp,
    definition_from_row,
    encode_json,
    encode_run,
    event_from_row,
    group_events,
    log_record_from_row,
    run_from_rows,
    sqlite_stamp,
    topic_record,
    utc,
)
from gyoza.server.store.tables import (
    UTCDateTime,
    agent_drains,
    agent_leases,
    op_attempts,
    op_definition_versions,
    op_definitions,
    op_events,
    op_logs,
    op_runs,
    topic_log,
)
from gyoza.server.store.writer import StaleCache

# Held (per transaction) by every transaction that appends to the topic log on
# PostgreSQL, so that offsets, taken from a sequence at insert time, become visible in
# commit order even with several server replicas: a subscriber resuming after offset N
# then never misses an N-1 that committed late. ("gyozatop" as a number.)
_TOPIC_LOCK = 0x67796F7A61746F70

# Columns a save overwrites; log_lines belongs to append_logs, created_at never changes.
_RUN_UPDATED = [name for name in RUN_COLUMNS if name not in ("id", "created_at")]
_ATTEMPT_UPDATED = [
    name for name in ATTEMPT_COLUMNS if name not in ("run_id", "attempt", "created_at")
]

# Most entries of the writer's caches (attempt rows, log line counts); when full, a
# cache is emptied (and refilled as runs are written).
_ATTEMPT_CACHE = 20_000
_LOG_COUNT_CACHE = 20_000


def _active_condition() -> ColumnElement[bool]:
    """Active runs (:func:`~gyoza.models.resources.is_active_run`), in SQL."""
    return or_(
        op_runs.c.state.in_([s.value for s in LIVE_STATES]),
        and_(
            op_runs.c.next_retry_at.is_not(None),
            op_runs.c.state.in_([s.value for s in RETRY_WAIT_STATES]),
        ),
    )


def _finished_condition() -> ColumnElement[bool]:
    """Runs that can no longer change: final, and not waiting for an automatic retry."""
    return and_(
        op_runs.c.state.in_([s.value for s in TERMINAL_STATES]), op_runs.c.next_retry_at.is_(None)
    )


def _is_foreign_key_violation(exc: Exception) -> bool:
    """Whether a driver's IntegrityError is a foreign key violation."""
    if getattr(exc, "sqlstate", None) == "23503":  # psycopg
        return True
    return getattr(exc, "sqlite_errorname", "") == "SQLITE_CONSTRAINT_FOREIGNKEY"


class StaleLogCount(StaleCache):
    """An attempt's stored log line count is not the one the writer remembered."""


def _columns(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _insert_sql(table: str, columns: Sequence[str], p: str) -> str:
    return f"INSERT INTO {table} ({_columns(columns)}) VALUES ({', '.join([p] * len(columns))})"


def _upsert_sql(
    table: str, columns: Sequence[str], key: Sequence[str], updated: Sequence[str], p: str
) -> str:
    assignments = ", ".join(f'"{name}" = excluded."{name}"' for name in updated)
    return (
        f"{_insert_sql(table, columns, p)} ON CONFLICT ({_columns(key)}) DO UPDATE SET "
        + assignments
    )


def _cursor(conn: Connection) -> Any:
    """A driver cursor on *conn*, inside the transaction *conn* is in."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def _execute_many(cursor: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if len(rows) == 1:
        cursor.execute(sql, rows[0])
    else:
        cursor.executemany(sql, rows)


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
        self._postgres = postgres = dialect == "postgresql"
        self.stamp: Stamp = utc if postgres else sqlite_stamp
        """How this dialect's writes hold timestamps (see :func:`rows.encode_run`)."""
        self._integrity_error: type[Exception]
        if postgres:
            import psycopg

            self._integrity_error = psycopg.IntegrityError
        else:
            import sqlite3

            self._integrity_error = sqlite3.IntegrityError
        # Kept by the writer thread (the only caller of the write methods), dropped on
        # every rollback: the attempt rows it last wrote, the log line counts.
        self._attempt_rows: dict[tuple[str, int], tuple[Any, ...]] = {}
        self._log_lines: dict[tuple[str, int], int] = {}
        self._memo = JsonMemo()

        insert = postgresql.insert if postgres else sqlite.insert
        next_version = insert(op_definition_versions)
        self._next_version = next_version.on_conflict_do_update(
            index_elements=[op_definition_versions.c.name],
            set_={"last_version": op_definition_versions.c.last_version + 1},
        ).returning(op_definition_versions.c.last_version)

        p = "%s" if postgres else "?"
        self._sql_request_owner = f"SELECT id FROM op_runs WHERE request_id = {p}"
        self._sql_insert_run = _insert_sql("op_runs", RUN_COLUMNS, p)
        self._sql_upsert_run = _upsert_sql("op_runs", RUN_COLUMNS, ("id",), _RUN_UPDATED, p)
        self._sql_upsert_attempt = _upsert_sql(
            "op_attempts", ATTEMPT_COLUMNS, ("run_id", "attempt"), _ATTEMPT_UPDATED, p
        )
        self._sql_insert_event = _insert_sql("op_events", EVENT_COLUMNS, p)
        if postgres:
            self._sql_topic_lock = f"SELECT pg_advisory_xact_lock({_TOPIC_LOCK})"
            self._sql_insert_topic = (
                _insert_sql("topic_log", TOPIC_COLUMNS, p) + ' RETURNING "offset"'
            )
        else:
            self._sql_insert_topic = _insert_sql("topic_log", ("offset", *TOPIC_COLUMNS), p)
            # AUTOINCREMENT: the largest offset ever used is in sqlite_sequence.
            self._sql_last_offset = (
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence"
                " WHERE name = 'topic_log'), 0),"
                ' COALESCE((SELECT MAX("offset") FROM topic_log), 0))'
            )
        self._sql_log_lines = (
            f"SELECT log_lines FROM op_attempts WHERE run_id = {p} AND attempt = {p}"
            + (" FOR UPDATE" if postgres else "")
        )
        self._sql_set_log_lines = (
            f"UPDATE op_attempts SET log_lines = {p}"
            f" WHERE run_id = {p} AND attempt = {p} AND log_lines = {p}"
        )
        self._sql_insert_log = _insert_sql(
            "op_logs", ("run_id", "attempt", "number", *LOG_COLUMNS), p
        )
        self._sql_trim_logs = (
            f"DELETE FROM op_logs WHERE run_id = {p} AND attempt = {p} AND number < {p}"
        )
        self._sql_read_topic = (
            'SELECT "offset", topic, run_id, attempt, event, attributes, run_state,'
            f' op_definition FROM topic_log WHERE topic = {p} AND "offset" > {p}'
            f' ORDER BY "offset" LIMIT {p}'
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
    #
    # The hot writes go to the driver directly (its own cursor on the connection's
    # DBAPI connection, inside the transaction the writer began), with SQL built once
    # here and rows already encoded as tuples by :func:`rows.encode_run`: SQLAlchemy's
    # per-statement work (cache keys, bind processors, result set-up) cost more than the
    # database did.

    def encode_run(self, run: OpRun, new_events: Iterable[tuple[int, EventEntry]]) -> RunWrite:
        """:func:`rows.encode_run` with this dialect's timestamps; call it from one
        thread (the event loop's)."""
        return encode_run(run, new_events, stamp=self.stamp, memo=self._memo)

    def forget(self) -> None:
        """Drop what the writer remembers of the database (after a rollback)."""
        self._attempt_rows.clear()
        self._log_lines.clear()

    def _check_write(self, write: RunWrite) -> None:
        if write.stamp is not self.stamp:
            raise ValueError(
                "the write was encoded for another dialect (use Repository.encode_run)"
            )

    def create_run(self, conn: Connection, write: RunWrite) -> list[TopicRecord]:
        """Insert a new run with its attempts and events.

        Raises
        ------
        AlreadyExists
            When a run has this id, or another run this request id.
        """
        self._check_write(write)
        cursor = _cursor(conn)
        if write.request_id is not None:
            cursor.execute(self._sql_request_owner, (write.request_id,))
            taken = cursor.fetchone()
            if taken is not None:
                raise AlreadyExists(
                    f"request id {write.request_id!r} was used already by run {taken[0]}"
                )
        try:
            cursor.execute(self._sql_insert_run, write.run)
        except self._integrity_error as exc:
            raise AlreadyExists(f"run {write.run_id} exists already") from exc
        records = self._write_children(cursor, [write])[0]
        # The attempts are new: no log lines yet.
        for row in write.attempts:
            self._log_lines[(row[0], row[1])] = 0
        return records

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
        for write in writes:
            self._check_write(write)
        runs = {w.run_id: w.run for w in writes}
        cursor = _cursor(conn)
        try:
            _execute_many(cursor, self._sql_upsert_run, list(runs.values()))
        except self._integrity_error as exc:
            requests = ", ".join(repr(w.request_id) for w in writes if w.request_id)
            raise AlreadyExists(f"request id {requests} was used already by another run") from exc
        return self._write_children(cursor, writes)

    def _write_children(self, cursor: Any, writes: Sequence[RunWrite]) -> list[list[TopicRecord]]:
        # Attempt rows as this writer last wrote them: an unchanged attempt (a finished
        # one, or one only an event was added to) is not written again. The cache is
        # dropped on every rollback, so it never holds what was not committed.
        cache = self._attempt_rows
        attempts: dict[tuple[str, int], tuple[Any, ...]] = {}
        for w in writes:
            for row in w.attempts:
                key = (row[0], row[1])
                if cache.get(key) != row:
                    attempts[key] = row
        if attempts:
            _execute_many(cursor, self._sql_upsert_attempt, list(attempts.values()))
            if len(cache) > _ATTEMPT_CACHE:
                cache.clear()
            cache.update(attempts)
        events = [e for w in writes for e in w.events]
        if events:
            try:
                _execute_many(cursor, self._sql_insert_event, events)
            except self._integrity_error as exc:
                runs = ", ".join(sorted({w.run_id for w in writes if w.events}))
                if _is_foreign_key_violation(exc):
                    raise ValueError(
                        f"run {runs}: a new event names an attempt the run lacks"
                    ) from exc
                keys = ", ".join(f"({e[1]}, {e[2]})" for e in events)
                raise AlreadyExists(
                    f"run {runs}: one of the events (attempt, seq) {keys} is stored already"
                ) from exc
        topic_rows = [t for w in writes for t in w.topic_rows]
        if not topic_rows:
            return [[] for _ in writes]
        offsets = iter(self._insert_topic_rows(cursor, topic_rows))
        return [
            [dataclasses.replace(record, offset=next(offsets)) for record in w.topics]
            for w in writes
        ]

    def _insert_topic_rows(self, cursor: Any, rows: list[tuple[Any, ...]]) -> list[int]:
        """Append rows to the topic log; their offsets, in order."""
        if self._postgres:
            cursor.execute(self._sql_topic_lock)
            if len(rows) == 1:
                cursor.execute(self._sql_insert_topic, rows[0])
                return [int(cursor.fetchone()[0])]
            cursor.executemany(self._sql_insert_topic, rows, returning=True)
            offsets = []
            while True:
                offsets.append(int(cursor.fetchone()[0]))
                if not cursor.nextset():
                    break
            return offsets
        # SQLite: the writer holds the database's write lock (BEGIN IMMEDIATE), so the
        # offsets can be handed out here, on from the largest ever used.
        cursor.execute(self._sql_last_offset)
        last = int(cursor.fetchone()[0])
        offsets = list(range(last + 1, last + 1 + len(rows)))
        _execute_many(
            cursor,
            self._sql_insert_topic,
            [(offset, *row) for offset, row in zip(offsets, rows, strict=True)],
        )
        return offsets

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

    def record_agents_seen(self, conn: Connection, seen: Mapping[str, datetime]) -> None:
        """Remember when each agent was last heard from (later times only)."""
        if not seen:
            return
        insert = (postgresql.insert if self._postgres else sqlite.insert)(agent_leases)
        statement = insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"last_seen_at": insert.excluded.last_seen_at},
            where=agent_leases.c.last_seen_at < insert.excluded.last_seen_at,
        )
        conn.execute(statement, [{"name": n, "last_seen_at": t} for n, t in seen.items()])

    def open_reconnect_windows(
        self, conn: Connection, fallback: Mapping[str, datetime], now: datetime
    ) -> dict[str, tuple[datetime, datetime]]:
        """For each agent of *fallback*: (last heard, when its reconnect window began).

        The window begins *now* unless it began already since the agent was last heard
        (an earlier restart), so restarts never extend it. An agent never recorded is
        taken as last heard at its *fallback* time.
        """
        found = {
            str(r.name): (r.last_seen_at, r.window_from)
            for r in conn.execute(
                select(agent_leases).where(agent_leases.c.name.in_(list(fallback)))
            )
        }
        result: dict[str, tuple[datetime, datetime]] = {}
        for name, default in fallback.items():
            last, window = found.get(name, (None, None))
            if last is None:
                last, window = default, now
                conn.execute(
                    agent_leases.insert().values(name=name, last_seen_at=last, window_from=now)
                )
            elif window is None or window < last:
                window = now
                conn.execute(
                    agent_leases.update().where(agent_leases.c.name == name).values(window_from=now)
                )
            result[name] = (last, window)
        return result

    def agents_last_seen(self, conn: Connection, names: Sequence[str]) -> dict[str, datetime]:
        """When these agents were last heard from (those never recorded: left out)."""
        if not names:
            return {}
        rows = conn.execute(
            select(agent_leases.c.name, agent_leases.c.last_seen_at).where(
                agent_leases.c.name.in_(list(names))
            )
        )
        return {str(name): when for name, when in rows}

    def event_counts(self, conn: Connection, run_ids: Sequence[str]) -> dict[str, int]:
        """How many events each run has stored, over all its attempts (0: left out)."""
        if not run_ids:
            return {}
        rows = conn.execute(
            select(op_events.c.run_id, func.count())
            .where(op_events.c.run_id.in_(list(run_ids)))
            .group_by(op_events.c.run_id)
        )
        return {str(run_id): int(count) for run_id, count in rows}

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
    # Runs: deletes
    # ------------------------------------------------------------------

    def delete_run(self, conn: Connection, run_id: str) -> None:
        """Delete a finished run with its attempts, events, logs and topic records.

        Raises
        ------
        NotFound
            When there is no such run.
        RunNotFinished
            When the run is not final, or waits for an automatic retry.
        """
        if self._delete_finished(conn, [run_id]):
            return
        state = conn.execute(
            select(op_runs.c.state, op_runs.c.next_retry_at).where(op_runs.c.id == run_id)
        ).first()
        if state is None:
            raise NotFound(f"run {run_id} does not exist")
        if state.next_retry_at is not None:
            raise RunNotFinished(
                f"run {run_id} is FAILED and waits for an automatic retry; only finished "
                "runs can be deleted"
            )
        raise RunNotFinished(
            f"run {run_id} is {state.state}; only COMPLETED, FAILED or CANCELLED runs can "
            "be deleted"
        )

    def delete_finished_before(
        self,
        conn: Connection,
        before: datetime,
        limit: int,
        exclude: Iterable[str] = (),
    ) -> list[str]:
        """Delete up to *limit* finished runs last changed before *before*, oldest first,
        with everything that belongs to them, except those in *exclude*; returns their
        ids."""
        skip = set(exclude)
        found = conn.execute(
            select(op_runs.c.id)
            .where(_finished_condition(), op_runs.c.updated_at < before)
            .order_by(op_runs.c.updated_at)
            .limit(limit + len(skip))
        ).scalars()
        ids = [run_id for run_id in found if run_id not in skip][:limit]
        return self._delete_finished(conn, ids) if ids else []

    def _delete_finished(self, conn: Connection, run_ids: Sequence[str]) -> list[str]:
        finished = set(
            conn.execute(
                select(op_runs.c.id).where(op_runs.c.id.in_(run_ids), _finished_condition())
            ).scalars()
        )
        ids = [run_id for run_id in run_ids if run_id in finished]
        if not ids:
            return []
        conn.execute(delete(topic_log).where(topic_log.c.run_id.in_(ids)))
        # Attempts, events and log lines go by ON DELETE CASCADE.
        conn.execute(delete(op_runs).where(op_runs.c.id.in_(ids)))
        gone = set(ids)
        for cache in (self._attempt_rows, self._log_lines):
            for key in [k for k in cache if k[0] in gone]:
                del cache[key]
        return ids

    # ------------------------------------------------------------------
    # Agent drains
    # ------------------------------------------------------------------

    def list_drains(self, conn: Connection) -> list[AgentDrain]:
        """Every drained agent, by name."""
        rows = conn.execute(select(agent_drains).order_by(agent_drains.c.name)).mappings()
        return [AgentDrain(r["name"], r["reason"], r["drained_at"]) for r in rows]

    def set_drain(self, conn: Connection, drain: AgentDrain) -> None:
        """Record a drain (again: the reason and time are replaced)."""
        conn.execute(delete(agent_drains).where(agent_drains.c.name == drain.name))
        conn.execute(
            agent_drains.insert().values(
                name=drain.name, reason=drain.reason, drained_at=drain.drained_at
            )
        )

    def clear_drain(self, conn: Connection, name: str) -> bool:
        """Forget an agent's drain; False when it was not drained."""
        return bool(conn.execute(delete(agent_drains).where(agent_drains.c.name == name)).rowcount)

    # ------------------------------------------------------------------
    # Logs
    # ------------------------------------------------------------------

    def append_logs(
        self, conn: Connection, run_id: str, attempt: int, rows: Sequence[tuple[str, str, Any]]
    ) -> int:
        """Number and store new lines of an attempt; returns the last line number.

        *rows* are (stream, text, t) as :func:`rows.log_rows` makes them. Only the
        newest ``log_retention`` lines are kept.

        Raises
        ------
        NotFound
            When the run has no such attempt.
        """
        return self.append_logs_many(conn, [(run_id, attempt, rows)])[0]

    def append_logs_many(
        self, conn: Connection, items: Sequence[tuple[str, int, Sequence[tuple[str, str, Any]]]]
    ) -> list[int]:
        """:meth:`append_logs` for several appends at once, as if applied in order.

        The line count of an attempt (its ``log_lines``) is read once and then kept in
        memory by the writer; each append sets the new count only where the stored one
        is still the remembered one, so a count changed behind the writer's back (a
        second store on the database) fails the batch, which the writer then applies
        again, with nothing remembered.
        """
        added: dict[tuple[str, int], int] = {}
        for run_id, attempt, rows in items:
            added[(run_id, attempt)] = added.get((run_id, attempt), 0) + len(rows)
        cursor = _cursor(conn)
        counts = self._log_lines
        before: dict[tuple[str, int], int] = {}
        for key in added:
            count = counts.get(key)
            if count is None:
                cursor.execute(self._sql_log_lines, key)
                found = cursor.fetchone()
                if found is None:
                    raise NotFound(f"run {key[0]} has no attempt {key[1]}")
                count = int(found[0])
            before[key] = count
        numbered: list[tuple[Any, ...]] = []
        results: list[int] = []
        position = dict(before)
        retention = self.log_retention
        ends = {key: before[key] + count for key, count in added.items()}
        for run_id, attempt, rows in items:
            key = (run_id, attempt)
            number = position[key]
            keep_from = ends[key] - retention + 1
            for stream, text, t in rows:
                number += 1
                if number >= keep_from:
                    numbered.append((run_id, attempt, number, stream, text, t))
            position[key] = number
            results.append(number)
        updates = [(ends[key], *key, before[key]) for key, count in added.items() if count]
        if updates:
            _execute_many(cursor, self._sql_set_log_lines, updates)
            if cursor.rowcount != len(updates):
                self.forget()
                raise StaleLogCount("an attempt's log line count changed behind the writer")
        if numbered:
            _execute_many(cursor, self._sql_insert_log, numbered)
        if len(counts) > _LOG_COUNT_CACHE:
            counts.clear()
        for key, end in ends.items():
            counts[key] = end
            keep_from = end - retention + 1
            if before[key] > 0 and keep_from > 1 and added[key]:
                cursor.execute(self._sql_trim_logs, (*key, keep_from))
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
        cursor = _cursor(conn)
        cursor.execute(self._sql_read_topic, (topic, after_offset, limit))
        return [topic_record(*row) for row in cursor.fetchall()]

    def latest_offset(self, conn: Connection) -> int:
        return int(
            conn.execute(select(func.coalesce(func.max(topic_log.c.offset), 0))).scalar_one()
        )
