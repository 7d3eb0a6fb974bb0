"""Bodies of the projects API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.json_schema import SkipJsonSchema

from taskapp.membership.models import ProjectRole
from taskapp.tasks.schemas import Description, Owner, Title


class ProjectCreate(BaseModel):
    """A new project, owned by the caller."""

    model_config = ConfigDict(extra="forbid")

    name: Title
    description: Description | None = None


def _update_schema(schema: dict[str, Any]) -> None:
    schema["minProperties"] = 1
    for name in ("name", "archived"):
        schema["properties"][name].pop("default", None)


class ProjectUpdate(BaseModel):
    """Rename, describe, archive or unarchive: only the fields sent change."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_update_schema)

    name: Title | SkipJsonSchema[None] = None
    description: Description | None = None
    archived: bool | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _meaningful(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("at least one of name, description, archived is required")
        for name in ("name", "archived"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} must not be null")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(include=self.model_fields_set)


class ProjectRead(BaseModel):
    id: uuid.UUID
    name: str
    description: str | None
    owner: str
    archived: bool
    personal: bool  # the owner's Inbox
    role: ProjectRole | None  # the caller's; none for an admin who is not a member
    created_at: datetime
    updated_at: datetime


class ProjectPage(BaseModel):
    total: int
    page: int
    page_size: int
    items: list[ProjectRead]


class MemberRead(BaseModel):
    user: str  # the member's subject
    role: ProjectRole
    owner: bool
    username: str | None
    name: str | None
    email: str | None
    added_at: datetime


class MemberPut(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: ProjectRole


class Transfer(BaseModel):
    """The new owner: a member's subject, username or e-mail address."""

    model_config = ConfigDict(extra="forbid")

    owner: Owner
