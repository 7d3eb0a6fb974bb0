"""Create the tasks table, hash-partitioned on owner into 8 partitions.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARTITIONS = 8


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'in_progress', 'completed')", name=op.f("ck_tasks_status_valid")
        ),
        sa.PrimaryKeyConstraint("owner", "id", name=op.f("pk_tasks")),
        postgresql_partition_by="HASH (owner)",
    )
    for remainder in range(PARTITIONS):
        op.execute(
            f"CREATE TABLE tasks_p{remainder} PARTITION OF tasks "
            f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {remainder})"
        )
    # Created on the parent, so every partition gets its own copy.
    op.create_index(
        "ix_tasks_owner_created_at_id",
        "tasks",
        ["owner", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_index(
        "ix_tasks_owner_status_created_at_id",
        "tasks",
        ["owner", "status", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.create_index(
        "ix_tasks_created_at_id", "tasks", [sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index("ix_tasks_id", "tasks", ["id"])


def downgrade() -> None:
    # Dropping the parent drops its partitions and indexes with it.
    op.drop_table("tasks")
