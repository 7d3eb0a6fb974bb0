"""The `tasks` table: hash-partitioned on the owner, so one owner's rows live in one partition."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, DateTime, Index, String, Text, Uuid, func, text
from sqlalchemy.orm import Mapped, mapped_column

from taskapp.database.base import Base

PARTITION_COUNT = 8
PARTITION_NAME = "tasks_p{}"


class TaskStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # Every owner-scoped query names the owner, so the planner prunes to one partition.
        CheckConstraint("status IN ('pending', 'in_progress', 'completed')", name="status_valid"),
        # GET /tasks for one owner, newest first; also serves the per-owner count.
        Index("ix_tasks_owner_created_at_id", "owner", text("created_at DESC"), text("id DESC")),
        # The same list filtered by status.
        Index(
            "ix_tasks_owner_status_created_at_id",
            "owner",
            "status",
            text("created_at DESC"),
            text("id DESC"),
        ),
        # The admin-wide list, newest first across all owners.
        Index("ix_tasks_created_at_id", text("created_at DESC"), text("id DESC")),
        # Admin reads and writes by id alone, where the owner (partition key) is unknown.
        Index("ix_tasks_id", "id"),
        {"postgresql_partition_by": "HASH (owner)"},
    )
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
