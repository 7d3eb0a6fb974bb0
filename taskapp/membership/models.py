"""`projects` and `project_members`.

Both are small beside `tasks` and read by the member (which projects may I see), so they are
not partitioned: under Citus they would be reference tables. Each member row repeats its
project's `owner`, the tenant (the partition key of that project's tasks), so that one
index lookup names the partitions a caller's tasks live in.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from taskapp.database.base import Base

INBOX_NAME = "Inbox"
# Each user's Inbox has an id derived from their subject, so that a task can be put in it
# without looking it up first.
_INBOX_NAMESPACE = uuid.UUID("5f0c7c1e-9a43-4c53-9a1e-2f1b0d6c8e11")


@functools.lru_cache(maxsize=65_536)
def inbox_id(subject: str) -> uuid.UUID:
    """The id of `subject`'s Inbox (a create needs it up to three times: ~3 µs each)."""
    return uuid.uuid5(_INBOX_NAMESPACE, subject)


class ProjectRole(StrEnum):
    VIEWER = "viewer"  # reads
    EDITOR = "editor"  # + creates, changes, assigns
    ADMIN = "admin"  # + members and the project's settings

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {ProjectRole.VIEWER: 0, ProjectRole.EDITOR: 1, ProjectRole.ADMIN: 2}


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (
        # One Inbox per user.
        Index(
            "uq_projects_personal_owner", "owner", unique=True, postgresql_where=text("personal")
        ),
        Index("ix_projects_owner", "owner"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    archived: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The owner's Inbox: never shared, archived, deleted or transferred.
    personal: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Member(Base):
    """A user's role in a project. The owner has a row too, always `admin`."""

    __tablename__ = "project_members"
    __table_args__ = (
        CheckConstraint("role IN ('viewer', 'editor', 'admin')", name="role_valid"),
        # The caller's projects, their tenants and roles: an index-only scan.
        Index(
            "ix_project_members_user_id",
            "user_id",
            "project_id",
            postgresql_include=["owner", "role"],
        ),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))  # the project's owner (the tenant)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
