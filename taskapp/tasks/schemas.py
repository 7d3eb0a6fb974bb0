"""Request and response bodies of the tasks API."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Annotated, Any, Self

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from taskapp.tasks.models import TaskStatus

TITLE_MAX = 255
DESCRIPTION_MAX = 10_000


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate (valid JSON "\ud800") is not
    # encodable UTF-8: refuse both here so they are a 422, not a driver error.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


# _storable's rules in the OpenAPI schema, so that clients (and generated tests) know them.
NO_NUL = Field(json_schema_extra={"pattern": "^[^\\u0000]*$"})
# ... and a title is not whitespace alone (it is trimmed, then must not be empty).
NOT_BLANK = Field(json_schema_extra={"pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$"})

Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX),
    AfterValidator(_storable),
    NOT_BLANK,
]
Owner = Annotated[
    str, StringConstraints(min_length=1, max_length=255), AfterValidator(_storable), NO_NUL
]
Description = Annotated[str, Field(max_length=DESCRIPTION_MAX), AfterValidator(_storable), NO_NUL]


def _distinct(users: list[str]) -> list[str]:
    return list(dict.fromkeys(users))


MAX_ASSIGNEES = 50
# Members of the task's project, by subject; a name given twice counts once.
Assignees = Annotated[list[Owner], Field(max_length=MAX_ASSIGNEES), AfterValidator(_distinct)]


class TaskCreate(BaseModel):
    """A new task. Unknown fields are rejected so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    title: Title
    description: Description | None = None
    status: TaskStatus = TaskStatus.PENDING
    # None: the caller's Inbox.
    project_id: uuid.UUID | None = None
    assignees: Assignees = []


def _update_schema(schema: dict[str, Any]) -> None:
    # The documented body is what is accepted: at least one field; title and status may be
    # left out but not set to null (their None defaults only mean "not sent").
    schema["minProperties"] = 1
    for name in ("title", "status", "project_id", "assignees"):
        schema["properties"][name].pop("default", None)


class TaskUpdate(BaseModel):
    """A partial update: only the fields sent change; at least one must be sent."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_update_schema)

    title: Title | SkipJsonSchema[None] = None
    description: Description | None = None
    status: TaskStatus | SkipJsonSchema[None] = None
    # Move to another project (editor there and here).
    project_id: uuid.UUID | SkipJsonSchema[None] = None
    # Replaces the set.
    assignees: Assignees | SkipJsonSchema[None] = None

    @model_validator(mode="after")
    def _meaningful(self) -> Self:
        if not self.model_fields_set:
            raise ValueError(
                "at least one of title, description, status, project_id, assignees is required"
            )
        # description may be cleared with null; a task always has a title and a status.
        for name in ("title", "status", "project_id", "assignees"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} must not be null")
        return self

    def changes(self) -> dict[str, object]:
        """The fields the client sent, as column values."""
        return self.model_dump(mode="json", include=self.model_fields_set)


class TaskRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    owner: str  # the owner of the task's project
    project_id: uuid.UUID
    created_by: str
    assignees: list[str]
    title: str
    description: str | None
    status: TaskStatus
    created_at: datetime
    updated_at: datetime


class TaskPage(BaseModel):
    total: int
    page: int
    page_size: int
    items: list[TaskRead]


# What the API answers with, written from rows as the models above would write them: orjson
# writes a page in a third of the time pydantic takes to validate and dump it, byte for byte
# the same for every value a task row holds (text, UUIDs, UTC times, NULL; tested).
_TASK_FIELDS = tuple(TaskRead.model_fields)
_JSON = orjson.OPT_UTC_Z


def _other(value: Any) -> Any:
    # asyncpg's UUIDs are its own subclass, which orjson leaves to this.
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not a value of a task")


def _task(row: Mapping[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in _TASK_FIELDS}


def task_json(row: Mapping[str, Any]) -> bytes:
    """`TaskRead`'s JSON of a task row."""
    return orjson.dumps(_task(row), default=_other, option=_JSON)


def page_json(total: int, page: int, page_size: int, rows: Iterable[Mapping[str, Any]]) -> bytes:
    """`TaskPage`'s JSON of a page of task rows."""
    body = {"total": total, "page": page, "page_size": page_size, "items": list(map(_task, rows))}
    return orjson.dumps(body, default=_other, option=_JSON)
