"""Task responses are written from rows without the models (`task_json`, `page_json`): the
bytes must be those the models write, for every value a task row can hold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from asyncpg.pgproto import pgproto
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskapp.database.driver import Connection
from taskapp.tasks.repository import TaskRepository
from taskapp.tasks.schemas import TaskPage, TaskRead, page_json, task_json
from testing.oidc import OIDCProvider
from tests.conftest import app_state

# Text PostgreSQL can store (no NUL, no lone surrogates): control characters, quotes,
# backslashes, line and paragraph separators, non-BMP characters included.
stored_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30
)
# What asyncpg returns for timestamptz: aware, in UTC, any microsecond (0 included).
utc_times = st.datetimes(
    min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
)
# asyncpg returns UUIDs of its own class (a subclass of uuid.UUID).
uuids = st.uuids() | st.uuids().map(lambda value: pgproto.UUID(value.bytes))
rows = st.fixed_dictionaries(
    {
        "id": uuids,
        "owner": stored_text,
        "project_id": uuids,
        "created_by": stored_text,
        "assignees": st.lists(stored_text, max_size=3),
        "title": stored_text,
        "description": st.none() | stored_text,
        "status": st.sampled_from(["pending", "in_progress", "completed"]),
        "created_at": utc_times,
        "updated_at": utc_times,
    },
    # Statements return more columns than a task's (the total, the caller's role).
    optional={"total": st.integers(), "role": st.none() | st.just("editor")},
)


@settings(max_examples=2_000, deadline=None)
@given(row=rows)
@example(
    row={
        "id": uuid.UUID(int=0),
        "owner": '\x01\x1f\x7f"\\/\u2028\u2029\ufeff😀',
        "project_id": uuid.UUID(int=2**128 - 1),
        "created_by": "é",
        "assignees": ["\t\n\r\b\f"],
        "title": "a",
        "description": None,
        "status": "pending",
        "created_at": datetime(2026, 12, 7, 22, 0, 0, 0, tzinfo=UTC),
        "updated_at": datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    }
)
def test_a_task_is_written_as_the_model_writes_it(row: dict[str, Any]) -> None:
    assert task_json(row) == TaskRead.model_validate(row).model_dump_json().encode()


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(rows, max_size=5),
    total=st.integers(min_value=0, max_value=2**62),
    page=st.integers(min_value=1, max_value=1_000_000),
    page_size=st.integers(min_value=1, max_value=100),
)
def test_a_page_is_written_as_the_model_writes_it(
    items: list[dict[str, Any]], total: int, page: int, page_size: int
) -> None:
    model = TaskPage.model_validate(
        {"total": total, "page": page, "page_size": page_size, "items": items}
    )
    assert page_json(total, page, page_size, items) == model.model_dump_json().encode()


async def test_rows_from_the_database_are_written_as_the_model_writes_them(
    client: httpx.AsyncClient, app: Any, oidc: OIDCProvider
) -> None:
    """The types asyncpg hands back (text, varchar, arrays, the status, timestamptz) are
    those the properties above cover."""
    alice = oidc.auth("alice")
    created = await client.post(
        "/tasks",
        json={"title": 'q"uo\\te \u2028 😀 \x1f', "description": "line\nnext\ttab"},
        headers=alice,
    )
    assert created.status_code == 201, created.text
    await client.post("/tasks", json={"title": "second"}, headers=alice)
    task_id = uuid.UUID(created.json()["id"])
    async with app_state(app).database.pool.acquire() as raw:
        repository = TaskRepository(Connection(raw))
        row = await repository.get(task_id, scope=None)
    assert row is not None
    assert task_json(row) == TaskRead.model_validate(dict(row)).model_dump_json().encode()
    read = await client.get(f"/tasks/{task_id}", headers=alice)
    assert read.content == TaskRead.model_validate(dict(row)).model_dump_json().encode()
    listed = await client.get("/tasks", headers=alice)
    assert listed.status_code == 200
    page = listed.json()
    assert page["total"] == 2
    assert page["items"][1] == read.json()
