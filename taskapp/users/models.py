"""The `users` table: one row per person who has called the API."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from taskapp.database.base import Base


class User(Base):
    """A person as their last token named them (refreshed at most once a minute)."""

    __tablename__ = "users"

    sub: Mapped[str] = mapped_column(String(255), primary_key=True)
    username: Mapped[str | None] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(255))
    email: Mapped[str | None] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    refreshed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


# Prefix search and exact lookup by username, e-mail and name, case-insensitively.
for _column in (User.username, User.email, User.name):
    Index(
        f"ix_users_{_column.key}",
        func.lower(_column).label(f"{_column.key}_lower"),
        postgresql_ops={f"{_column.key}_lower": "text_pattern_ops"},
    )
