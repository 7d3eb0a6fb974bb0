"""The outbox: one row per event, written in the transaction of the change it records, and
one row per delivery of it to a consumer, with that delivery's progress."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from taskapp.database.base import Base


class Event(Base):
    """Something that happened to an aggregate (a task), as of the moment it happened."""

    __tablename__ = "events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    aggregate_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    # The tenant: the owner of what the aggregate belongs to (the partition key of tasks).
    owner: Mapped[str] = mapped_column(String(255))
    # Who made it happen (a token's subject).
    actor: Mapped[str] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # given up on
    SKIPPED = "skipped"  # nothing to deliver (an e-mail without a usable address)


class Delivery(Base):
    """One event handed to one consumer: at most once, retried with back-off until it is."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'sent', 'failed', 'skipped')", name="status_valid"),
        # The sweep's query: pending deliveries that are due, oldest first.
        Index(
            "ix_deliveries_pending_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
    )

    # No foreign key to events: the outbox writes an event and its deliveries in one statement,
    # and the key's check would cost every change a lookup and a row lock on the new event.
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Whom it goes to (an e-mail address); none for a skipped delivery.
    target: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), server_default=DeliveryStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
