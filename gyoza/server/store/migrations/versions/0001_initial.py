"""Initial schema: definitions, runs, attempts, events, logs, topic log.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "op_definitions",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name", "version", name="pk_op_definitions"),
    )
    op.create_table(
        "op_definition_versions",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("last_version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_op_definition_versions"),
    )
    op.create_table(
        "op_runs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("image", sa.Text(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("constraints", sa.JSON(), nullable=False),
        sa.Column("retry_policy", sa.JSON(), nullable=False),
        sa.Column("event_delivery", sa.JSON(), nullable=False),
        sa.Column("op_definition", sa.String(200), nullable=True),
        sa.Column("op_definition_version", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.String(200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("next_retry_at", _TS, nullable=True),
        sa.Column("current_attempt", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_op_runs"),
        sa.UniqueConstraint("request_id", name="uq_op_runs_request_id"),
    )
    op.create_index("ix_op_runs_created", "op_runs", ["created_at", "id"])
    op.create_index("ix_op_runs_state", "op_runs", ["state", "created_at", "id"])
    op.create_index("ix_op_runs_op_definition", "op_runs", ["op_definition", "created_at", "id"])
    op.create_index("ix_op_runs_image", "op_runs", ["image", "created_at", "id"])
    op.create_index(
        "ix_op_runs_retry",
        "op_runs",
        ["next_retry_at"],
        sqlite_where=sa.text("next_retry_at IS NOT NULL"),
        postgresql_where=sa.text("next_retry_at IS NOT NULL"),
    )
    op.create_table(
        "op_attempts",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("execution_summary", sa.JSON(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("constraints", sa.JSON(), nullable=True),
        sa.Column("reported_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("log_lines", sa.BigInteger(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("run_id", "attempt", name="pk_op_attempts"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["op_runs.id"], ondelete="CASCADE", name="fk_op_attempts_run"
        ),
    )
    op.create_table(
        "op_events",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("seq", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("msg", sa.Text(), nullable=False),
        sa.Column("msg_int", sa.BigInteger(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("t", _TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "attempt", "seq", name="pk_op_events"),
        sa.ForeignKeyConstraint(
            ["run_id", "attempt"],
            ["op_attempts.run_id", "op_attempts.attempt"],
            ondelete="CASCADE",
            name="fk_op_events_attempt",
        ),
    )
    op.create_table(
        "op_logs",
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("number", sa.BigInteger(), nullable=False, autoincrement=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("t", _TS, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "attempt", "number", name="pk_op_logs"),
        sa.ForeignKeyConstraint(
            ["run_id", "attempt"],
            ["op_attempts.run_id", "op_attempts.attempt"],
            ondelete="CASCADE",
            name="fk_op_logs_attempt",
        ),
    )
    op.create_table(
        "topic_log",
        sa.Column(
            "offset",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
            autoincrement=True,
        ),
        sa.Column("topic", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("event", sa.JSON(), nullable=False),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("run_state", sa.String(16), nullable=False),
        sa.Column("op_definition", sa.String(200), nullable=True),
        sa.Column("t", _TS, nullable=False),
        sa.PrimaryKeyConstraint("offset", name="pk_topic_log"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_topic_log_topic", "topic_log", ["topic", "offset"])


def downgrade() -> None:
    op.drop_index("ix_topic_log_topic", table_name="topic_log")
    op.drop_table("topic_log")
    op.drop_table("op_logs")
    op.drop_table("op_events")
    op.drop_table("op_attempts")
    for index in (
        "ix_op_runs_retry",
        "ix_op_runs_image",
        "ix_op_runs_op_definition",
        "ix_op_runs_state",
        "ix_op_runs_created",
    ):
        op.drop_index(index, table_name="op_runs")
    op.drop_table("op_runs")
    op.drop_table("op_definition_versions")
    op.drop_table("op_definitions")
