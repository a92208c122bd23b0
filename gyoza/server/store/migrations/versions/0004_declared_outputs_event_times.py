"""Declared outputs of a run; the time an event was applied, apart from when it happened.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # Both nullable: existing runs declare no outputs; existing events were applied at t.
    with op.batch_alter_table("op_runs") as batch:
        batch.add_column(sa.Column("output_specs", sa.JSON(), nullable=True))
    with op.batch_alter_table("op_events") as batch:
        batch.add_column(sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("op_events") as batch:
        batch.drop_column("applied_at")
    with op.batch_alter_table("op_runs") as batch:
        batch.drop_column("output_specs")
