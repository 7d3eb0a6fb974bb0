"""The `tasks` table: hash-partitioned on the owner of each task's project (the tenant), so a
project's rows live in one partition."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Index, String, Text, Uuid, func, text
from sqlalchemy.dialects.postgresql import ARRAY
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
        # `task_counts` takes '' for "all the tasks" (migration 0005): no assignee is ''.
        CheckConstraint(
            "array_position(assignees, NULL) IS NULL AND NOT ('' = ANY (assignees))",
            name="assignees_valid",
        ),
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
        # One project's tasks, newest first (`?project=`, and a shared project's members).
        Index(
            "ix_tasks_owner_project_id_created_at_id",
            "owner",
            "project_id",
            text("created_at DESC"),
            text("id DESC"),
        ),
        # `?assignee=`: the tasks whose assignees contain a user.
        Index("ix_tasks_assignees", "assignees", postgresql_using="gin"),
        {"postgresql_partition_by": "HASH (owner)"},
    )
    __mapper_args__ = {"eager_defaults": True}  # noqa: RUF012

    # The owner of the task's project: the tenant, and the partition key.
    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_by: Mapped[str] = mapped_column(String(255))
    # Members of the project; kept in the row (no join to read a task, one index to filter).
    assignees: Mapped[list[str]] = mapped_column(
        ARRAY(String(255)), server_default=text("'{}'::character varying[]")
    )
    title: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# `TaskCount.assignee` of the count of all a project's tasks.
ALL_ASSIGNEES = ""


class TaskCount(Base):
    """How many tasks a project has in each status, all of them (`assignee` is
    ALL_ASSIGNEES) and each assignee's, kept by triggers on `tasks` in the transaction of
    every change (migration 0005): a list's total is read from here in time that does not
    grow with the project. Carries `owner`, the tenant, like the tasks."""

    __tablename__ = "task_counts"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    assignee: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    tasks: Mapped[int] = mapped_column(BigInteger)


class TaskAssignment(Base):
    """A user assigned to a task, one row per (task, assignee), kept by the same triggers from
    `tasks.assignees`: "assigned to me" newest first is an ordered index scan per tenant,
    which the GIN index of `assignees` cannot give (it finds every such task, unordered)."""

    __tablename__ = "task_assignments"
    __table_args__ = (
        Index(
            "ix_task_assignments_owner_user_id_created_at_task_id",
            "owner",
            "user_id",
            text("created_at DESC"),
            text("task_id DESC"),
            postgresql_include=["project_id", "status"],
        ),
    )

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    task_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    project_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
