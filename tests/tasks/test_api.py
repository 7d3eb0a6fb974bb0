"""The tasks API's happy paths, per the HTTP contract, checked against the database too."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import insert

from taskapp.membership.models import inbox_id
from taskapp.tasks.models import Task
from testing.oidc import OIDCProvider
from tests.conftest import app_state
from tests.fixtures.tasks import create, db_row

NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
STATUSES = ("pending", "in_progress", "completed")


def parse_utc(value: Any) -> datetime:
    """An ISO 8601 timestamp with an explicit UTC offset."""
    assert isinstance(value, str)
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


# --- create -------------------------------------------------------------------------------


async def test_create_returns_the_task(client: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    before = datetime.now(UTC)
    response = await client.post(
        "/tasks",
        json={"title": "  Buy milk \t", "description": "two litres"},
        headers=oidc.auth("alice"),
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert str(uuid.UUID(body["id"])) == body["id"]  # a canonical UUID string
    assert body["title"] == "Buy milk"
    assert body["description"] == "two litres"
    assert body["status"] == "pending"
    created_at = parse_utc(body["created_at"])
    updated_at = parse_utc(body["updated_at"])
    assert updated_at >= created_at
    # The database's clock and ours are the same machine's; allow a little skew.
    assert before - timedelta(seconds=30) <= created_at <= datetime.now(UTC) + timedelta(seconds=30)


async def test_create_with_only_a_title_defaults(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    body = await create(client, oidc.auth("alice"), title="Just a title")
    assert body["description"] is None
    assert body["status"] == "pending"


@pytest.mark.parametrize("status", STATUSES)
async def test_create_with_explicit_status(
    client: httpx.AsyncClient, oidc: OIDCProvider, status: str
) -> None:
    body = await create(client, oidc.auth("alice"), title="t", status=status)
    assert body["status"] == status


async def test_create_is_committed_before_the_response(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider
) -> None:
    body = await create(client, oidc.auth("alice"), title=" Stored ", description="d")
    row = await db_row(app, body["id"])
    assert row is not None
    assert row["owner"] == "alice"
    assert row["title"] == "Stored"
    assert row["description"] == "d"
    assert row["status"] == "pending"
    assert row["created_at"] == parse_utc(body["created_at"])
    assert row["updated_at"] == parse_utc(body["updated_at"])


async def test_created_task_reads_back_identically(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    auth = oidc.auth("alice")
    body = await create(client, auth, title="Read me", description="text", status="in_progress")
    response = await client.get(f"/tasks/{body['id']}", headers=auth)
    assert response.status_code == 200
    assert response.json() == body


# --- list ---------------------------------------------------------------------------------


async def test_list_empty(client: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    response = await client.get("/tasks", headers=oidc.auth("alice"))
    assert response.status_code == 200
    assert response.json() == {"total": 0, "page": 1, "page_size": 10, "items": []}


async def test_list_defaults_to_first_page_of_ten_newest_first(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    auth = oidc.auth("alice")
    created = [await create(client, auth, title=f"task {n}") for n in range(12)]
    response = await client.get("/tasks", headers=auth)
    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"total", "page", "page_size", "items"}
    assert (page["total"], page["page"], page["page_size"]) == (12, 1, 10)
    newest_first = [task["id"] for task in reversed(created)]
    assert [item["id"] for item in page["items"]] == newest_first[:10]
    # Items are full tasks, identical to what POST returned.
    by_id = {task["id"]: task for task in created}
    for item in page["items"]:
        assert item == by_id[item["id"]]


@pytest.mark.parametrize("page_size", [1, 3, 7, 10, 23, 100])
async def test_pages_partition_the_set(
    client: httpx.AsyncClient, oidc: OIDCProvider, page_size: int
) -> None:
    auth = oidc.auth("alice")
    created = [await create(client, auth, title=f"task {n}") for n in range(23)]
    newest_first = [task["id"] for task in reversed(created)]
    pages = -(-len(created) // page_size)
    seen: list[str] = []
    for number in range(1, pages + 1):
        response = await client.get(
            "/tasks", params={"page": number, "page_size": page_size}, headers=auth
        )
        assert response.status_code == 200
        body = response.json()
        assert (body["total"], body["page"], body["page_size"]) == (23, number, page_size)
        expected_len = page_size if number < pages else len(created) - page_size * (pages - 1)
        assert len(body["items"]) == expected_len
        seen.extend(item["id"] for item in body["items"])
    assert seen == newest_first  # no duplicates, no gaps, in order


async def test_equal_created_at_is_ordered_by_id_desc_across_pages(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider
) -> None:
    # Timestamps collide in bulk imports and within one transaction: the id breaks the tie,
    # so paging stays stable.
    moment = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    ids = [uuid.uuid4() for _ in range(9)]
    async with app_state(app).engine.begin() as connection:
        await connection.execute(
            insert(Task),
            [
                {
                    "owner": "alice",
                    "id": task_id,
                    "project_id": inbox_id("alice"),
                    "created_by": "alice",
                    "title": "tie",
                    "status": "pending",
                    "created_at": moment,
                    "updated_at": moment,
                }
                for task_id in ids
            ],
        )
    auth = oidc.auth("alice")
    newer = await create(client, auth, title="newer")
    seen: list[str] = []
    for number in (1, 2, 3, 4):
        response = await client.get("/tasks", params={"page": number, "page_size": 3}, headers=auth)
        assert response.status_code == 200
        assert response.json()["total"] == 10
        seen.extend(item["id"] for item in response.json()["items"])
    expected = [newer["id"]] + [str(task_id) for task_id in sorted(ids, reverse=True)]
    assert seen == expected


@pytest.mark.parametrize("page", [3, 4, 1000])
async def test_page_beyond_the_end_is_empty_with_total(
    client: httpx.AsyncClient, oidc: OIDCProvider, page: int
) -> None:
    auth = oidc.auth("alice")
    for n in range(5):
        await create(client, auth, title=f"task {n}")
    response = await client.get("/tasks", params={"page": page, "page_size": 2}, headers=auth)
    assert response.status_code == 200
    body = response.json()
    if page == 3:
        assert len(body["items"]) == 1
    else:
        assert body["items"] == []
    assert (body["total"], body["page"], body["page_size"]) == (5, page, 2)


@pytest.mark.parametrize(("page_size", "expected"), [(1, 1), (100, 4)])
async def test_page_size_limits_are_accepted(
    client: httpx.AsyncClient, oidc: OIDCProvider, page_size: int, expected: int
) -> None:
    auth = oidc.auth("alice")
    for n in range(4):
        await create(client, auth, title=f"task {n}")
    response = await client.get("/tasks", params={"page_size": page_size}, headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["total"], body["page"], body["page_size"]) == (4, 1, page_size)
    assert len(body["items"]) == expected


@pytest.mark.parametrize("status", STATUSES)
async def test_list_filters_by_status(
    client: httpx.AsyncClient, oidc: OIDCProvider, status: str
) -> None:
    auth = oidc.auth("alice")
    counts = {"pending": 2, "in_progress": 1, "completed": 3}
    created: list[dict[str, Any]] = []
    for _ in range(3):  # interleave statuses so the filter, not the order, does the work
        for each, count in counts.items():
            if sum(task["status"] == each for task in created) < count:
                created.append(await create(client, auth, title=each, status=each))
    response = await client.get("/tasks", params={"status": status}, headers=auth)
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == counts[status]
    expected = [task["id"] for task in reversed(created) if task["status"] == status]
    assert [item["id"] for item in body["items"]] == expected
    assert all(item["status"] == status for item in body["items"])


async def test_status_filter_with_paging(client: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    auth = oidc.auth("alice")
    done = [await create(client, auth, title=f"d{n}", status="completed") for n in range(5)]
    for n in range(4):
        await create(client, auth, title=f"p{n}")
    response = await client.get(
        "/tasks", params={"status": "completed", "page": 2, "page_size": 2}, headers=auth
    )
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == 5
    assert [item["id"] for item in body["items"]] == [task["id"] for task in done[::-1][2:4]]


# --- read ---------------------------------------------------------------------------------


async def test_get_one(client: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    auth = oidc.auth("alice")
    first = await create(client, auth, title="first")
    second = await create(client, auth, title="second", description="2nd", status="completed")
    for task in (first, second):
        response = await client.get(f"/tasks/{task['id']}", headers=auth)
        assert response.status_code == 200
        assert response.json() == task


async def test_get_accepts_uppercase_uuid(client: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    auth = oidc.auth("alice")
    task = await create(client, auth)
    response = await client.get(f"/tasks/{task['id'].upper()}", headers=auth)
    assert response.status_code == 200
    assert response.json()["id"] == task["id"]


# --- update -------------------------------------------------------------------------------

ORIGINAL = {"title": "Original", "description": "Original description", "status": "pending"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"title": "  Renamed  "}, {"title": "Renamed"}),
        ({"description": "New description"}, {"description": "New description"}),
        ({"description": ""}, {"description": ""}),
        ({"status": "in_progress"}, {"status": "in_progress"}),
        ({"status": "completed"}, {"status": "completed"}),
        ({"status": "pending"}, {"status": "pending"}),
        (
            {"title": "All", "description": "changed", "status": "completed"},
            {"title": "All", "description": "changed", "status": "completed"},
        ),
    ],
    ids=["title", "description", "description-empty", "in_progress", "completed", "pending", "all"],
)
async def test_patch_changes_only_sent_fields(
    client: httpx.AsyncClient,
    app: FastAPI,
    oidc: OIDCProvider,
    change: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    auth = oidc.auth("alice")
    task = await create(client, auth, **ORIGINAL)
    response = await client.patch(f"/tasks/{task['id']}", json=change, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {
        **task,
        **expected,
        "updated_at": body["updated_at"],
    }
    assert parse_utc(body["created_at"]) == parse_utc(task["created_at"])
    assert parse_utc(body["updated_at"]) > parse_utc(task["updated_at"])
    # Committed before the response: a fresh connection sees the new values.
    row = await db_row(app, task["id"])
    assert row is not None
    for field in ("title", "description", "status"):
        assert row[field] == body[field]
    assert row["owner"] == "alice"
    assert row["updated_at"] == parse_utc(body["updated_at"])
    assert row["created_at"] == parse_utc(task["created_at"])
    # And a later read agrees.
    again = await client.get(f"/tasks/{task['id']}", headers=auth)
    assert again.json() == body


async def test_patch_description_null_clears_it(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider
) -> None:
    auth = oidc.auth("alice")
    task = await create(client, auth, **ORIGINAL)
    response = await client.patch(f"/tasks/{task['id']}", json={"description": None}, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["description"] is None
    assert (body["title"], body["status"]) == (task["title"], task["status"])
    row = await db_row(app, task["id"])
    assert row is not None
    assert row["description"] is None


async def test_successive_patches_keep_moving_updated_at(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    auth = oidc.auth("alice")
    task = await create(client, auth)
    stamps = [parse_utc(task["updated_at"])]
    for status in ("in_progress", "completed", "in_progress"):
        response = await client.patch(f"/tasks/{task['id']}", json={"status": status}, headers=auth)
        assert response.status_code == 200
        stamps.append(parse_utc(response.json()["updated_at"]))
        assert parse_utc(response.json()["created_at"]) == parse_utc(task["created_at"])
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


# --- delete -------------------------------------------------------------------------------


async def test_delete_then_gone(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider
) -> None:
    alice = oidc.auth("alice")
    admin = oidc.auth("root", roles=["admin"])
    task = await create(client, alice, title="doomed")
    keep = await create(client, alice, title="kept")
    response = await client.delete(f"/tasks/{task['id']}", headers=admin)
    assert response.status_code == 204
    assert response.content == b""
    assert await db_row(app, task["id"]) is None  # committed before the response
    assert await db_row(app, keep["id"]) is not None
    for auth in (alice, admin):
        gone = await client.get(f"/tasks/{task['id']}", headers=auth)
        assert gone.status_code == 404
        assert gone.json() == NOT_FOUND
    again = await client.delete(f"/tasks/{task['id']}", headers=admin)
    assert again.status_code == 404
    assert again.json() == NOT_FOUND
    listed = await client.get("/tasks", headers=alice)
    assert listed.json()["total"] == 1
    assert [item["id"] for item in listed.json()["items"]] == [keep["id"]]


# --- missing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "who"),
    [("GET", "user"), ("GET", "admin"), ("PATCH", "user"), ("PATCH", "admin"), ("DELETE", "admin")],
)
async def test_missing_task_is_404(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider, method: str, who: str
) -> None:
    auth = oidc.auth("alice") if who == "user" else oidc.auth("root", roles=["admin"])
    existing = await create(client, auth, title="unrelated")
    missing = uuid.uuid4()
    kwargs: dict[str, Any] = {"json": {"title": "x"}} if method == "PATCH" else {}
    response = await client.request(method, f"/tasks/{missing}", headers=auth, **kwargs)
    assert response.status_code == 404
    assert response.json() == NOT_FOUND
    row = await db_row(app, existing["id"])
    assert row is not None
    assert row["title"] == "unrelated"
