"""SQLAlchemy Core tables of the store.

The schema itself is created and changed only by the Alembic migrations in
``migrations/versions``; these definitions are what the repository queries with, and
``tests/store`` checks that the migrated schema matches them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData()

# SQLite only makes an ``INTEGER PRIMARY KEY`` an alias of the rowid (and so
# auto-incrementing); BIGINT elsewhere.
_Offset = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database keeps.

    PostgreSQL has ``timestamptz``; SQLite keeps naive text, so values are stored as
    naive UTC there and given back their UTC offset when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store takes aware datetimes only")
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


op_definitions = Table(
    "op_definitions",
    metadata,
    Column("name", String(200), nullable=False),
    Column("version", BigInteger, nullable=False, autoincrement=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("name", "version", name="pk_op_definitions"),
)

# The last version handed out per name, so that a version number is never reused even
# after the newest versions were deleted: runs keep pointing at what they ran.
op_definition_versions = Table(
    "op_definition_versions",
    metadata,
    Column("name", String(200), nullable=False),
    Column("last_version", BigInteger, nullable=False),
    PrimaryKeyConstraint("name", name="pk_op_definition_versions"),
)

op_runs = Table(
    "op_runs",
    metadata,
    Column("id", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("priority", Integer, nullable=False),
    Column("image", Text, nullable=False),
    Column("inputs", JSON, nullable=False),
    Column("constraints", JSON, nullable=False),
    Column("retry_policy", JSON, nullable=False),
    Column("event_delivery", JSON, nullable=False),
    Column("op_definition", String(200), nullable=True),
    Column("op_definition_version", BigInteger, nullable=True),
    Column("request_id", String(200), nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("next_retry_at", UTCDateTime, nullable=True),
    Column("current_attempt", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # The outputs its definition declares (a list of OutputSpec documents); NULL: none.
    Column("output_specs", JSON, nullable=True),
    PrimaryKeyConstraint("id", name="pk_op_runs"),
    UniqueConstraint("request_id", name="uq_op_runs_request_id"),
    # Every list filter ends in the keyset (created_at, id), so a filtered page is one
    # index range scan in either direction.
    Index("ix_op_runs_created", "created_at", "id"),
    Index("ix_op_runs_state", "state", "created_at", "id"),
    Index("ix_op_runs_op_definition", "op_definition", "created_at", "id"),
    Index("ix_op_runs_image", "image", "created_at", "id"),
    # Finished runs by age, for retention: one range scan per final state.
    Index("ix_op_runs_updated", "state", "updated_at"),
    # Failed runs waiting for an automatic retry, for load_active_runs; few of them.
    Index(
        "ix_op_runs_retry",
        "next_retry_at",
        sqlite_where=text("next_retry_at IS NOT NULL"),
        postgresql_where=text("next_retry_at IS NOT NULL"),
    ),
)

op_attempts = Table(
    "op_attempts",
    metadata,
    Column("run_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False, autoincrement=False),
    Column("state", String(16), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("outputs", JSON, nullable=False),
    Column("execution_summary", JSON, nullable=False),
    # NULL: the same as the run's (the common case, so they are not stored twice).
    Column("inputs", JSON, nullable=True),
    Column("constraints", JSON, nullable=True),
    Column("reported_seq", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    # Log lines ever appended; the next line is number log_lines + 1. Owned by
    # append_logs: saving a run never writes it.
    Column("log_lines", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("run_id", "attempt", name="pk_op_attempts"),
    ForeignKeyConstraint(["run_id"], ["op_runs.id"], ondelete="CASCADE", name="fk_op_attempts_run"),
)

op_events = Table(
    "op_events",
    metadata,
    Column("run_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False, autoincrement=False),
    Column("seq", BigInteger, nullable=False, autoincrement=False),
    Column("type", String(16), nullable=False),
    # The message as text; msg_int holds it when it was an integer (a PROGRESS
    # percentage) so that it reads back as an int.
    Column("msg", Text, nullable=False),
    Column("msg_int", BigInteger, nullable=True),
    Column("payload", JSON, nullable=False),
    # When it happened (an agent's report time) and, when that differs, when the server
    # applied it (NULL: at t).
    Column("t", UTCDateTime, nullable=False),
    Column("applied_at", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("run_id", "attempt", "seq", name="pk_op_events"),
    ForeignKeyConstraint(
        ["run_id", "attempt"],
        ["op_attempts.run_id", "op_attempts.attempt"],
        ondelete="CASCADE",
        name="fk_op_events_attempt",
    ),
)

op_logs = Table(
    "op_logs",
    metadata,
    Column("run_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False, autoincrement=False),
    Column("number", BigInteger, nullable=False, autoincrement=False),
    Column("stream", String(8), nullable=False),
    Column("text", Text, nullable=False),
    Column("t", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("run_id", "attempt", "number", name="pk_op_logs"),
    ForeignKeyConstraint(
        ["run_id", "attempt"],
        ["op_attempts.run_id", "op_attempts.attempt"],
        ondelete="CASCADE",
        name="fk_op_logs_attempt",
    ),
)

topic_log = Table(
    "topic_log",
    metadata,
    Column("offset", _Offset, nullable=False, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("type", String(16), nullable=False),
    Column("event", JSON, nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("run_state", String(16), nullable=False),
    Column("op_definition", String(200), nullable=True),
    Column("t", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("offset", name="pk_topic_log"),
    Index("ix_topic_log_topic", "topic", "offset"),
    # A deleted run's records go with it.
    Index("ix_topic_log_run", "run_id"),
    # AUTOINCREMENT: offsets are never reused, even once the newest rows are gone.
    sqlite_autoincrement=True,
)

# When each agent was last heard from, kept across restarts, so that a server restarting
# often cannot keep re-arming a dead agent's lease (see RunController.start).
agent_leases = Table(
    "agent_leases",
    metadata,
    Column("name", String(200), nullable=False),
    Column("last_seen_at", UTCDateTime, nullable=False),
    # When the server, restarted, began to wait for it to reconnect since then.
    Column("window_from", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("name", name="pk_agent_leases"),
)

# Agents an operator drained: they stay drained across their restarts and the server's,
# until undrained.
agent_drains = Table(
    "agent_drains",
    metadata,
    Column("name", String(200), nullable=False),
    Column("reason", Text, nullable=False),
    Column("drained_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("name", name="pk_agent_drains"),
)

# The replica that runs the core (the controller, the scheduler, the agent sessions) on a
# shared PostgreSQL database: one row per role, its holder, the address other replicas
# forward calls to, and a term that every takeover increments. The holder's writes check
# the term inside their transaction (see leadership.py). Unused on SQLite.
leadership = Table(
    "leadership",
    metadata,
    Column("name", String(64), nullable=False),
    Column("holder", String(200), nullable=False),
    Column("address", String(300), nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    # The holder's lease connection (its backend pid and start): a challenger may take
    # over at once when that session is gone, instead of waiting for the expiry.
    Column("session_pid", BigInteger, nullable=True),
    Column("session_start", UTCDateTime, nullable=True),
    PrimaryKeyConstraint("name", name="pk_leadership"),
)
