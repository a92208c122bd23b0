"""Fleet operations: durable agent drains, and indexes for deleting finished runs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agent_drains",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("drained_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_agent_drains"),
    )
    op.create_index("ix_op_runs_updated", "op_runs", ["state", "updated_at"])
    op.create_index("ix_topic_log_run", "topic_log", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_topic_log_run", table_name="topic_log")
    op.drop_index("ix_op_runs_updated", table_name="op_runs")
    op.drop_table("agent_drains")
