"""Replace the notifications outbox with events and their deliveries, keeping every row.

Each notification becomes the event it reported (same id, so a mail still to be sent keeps
its Message-ID) and that event's delivery to the `email` consumer, with its status,
attempts, last error and schedule. The creator's address moves into the event's payload
(`email`) and is the delivery's `target`. The downgrade does the reverse for the e-mail
deliveries; events no consumer of the old schema knew have nowhere to go and are dropped.

`deliveries` has no foreign key to `events`: the outbox writes an event and its deliveries in
one statement, and the key's check would cost every change a lookup and a row lock on the
event it has just inserted. Whatever removes old events removes their deliveries too.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("aggregate_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_table(
        "deliveries",
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("target", sa.String(320), nullable=True),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'skipped')",
            name=op.f("ck_deliveries_status_valid"),
        ),
        sa.PrimaryKeyConstraint("event_id", "consumer", name=op.f("pk_deliveries")),
    )
    op.create_index(
        "ix_deliveries_pending_due",
        "deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.execute(
        """
        INSERT INTO events (id, kind, aggregate_id, owner, actor, payload, created_at)
        SELECT id, kind, task_id, owner, owner,
               payload || jsonb_build_object('email', recipient), created_at
        FROM notifications
        """
    )
    op.execute(
        """
        INSERT INTO deliveries
            (event_id, consumer, target, status, attempts, last_error, next_attempt_at,
             finished_at)
        SELECT id, 'email', recipient, status, attempts, last_error, next_attempt_at, sent_at
        FROM notifications
        """
    )
    op.drop_table("notifications")


def downgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=True),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'skipped')",
            name=op.f("ck_notifications_status_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    op.create_index(
        "ix_notifications_pending_due",
        "notifications",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.execute(
        """
        INSERT INTO notifications
            (id, kind, task_id, owner, recipient, payload, status, attempts, last_error,
             next_attempt_at, created_at, sent_at)
        SELECT e.id, e.kind, e.aggregate_id, e.owner, d.target, e.payload - 'email',
               d.status, d.attempts, d.last_error, d.next_attempt_at, e.created_at,
               d.finished_at
        FROM events e JOIN deliveries d ON d.event_id = e.id AND d.consumer = 'email'
        """
    )
    op.drop_table("deliveries")
    op.drop_table("events")
