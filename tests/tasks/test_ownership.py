"""Ownership and roles: users see only their own tasks; admins see and change all."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from testing.oidc import AUDIENCE, OIDCProvider
from tests.fixtures.tasks import create, db_count, db_row

NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}


@pytest.fixture
def alice(oidc: OIDCProvider) -> dict[str, str]:
    return oidc.auth("alice")


@pytest.fixture
def bob(oidc: OIDCProvider) -> dict[str, str]:
    return oidc.auth("bob")


@pytest.fixture
def admin(oidc: OIDCProvider) -> dict[str, str]:
    return oidc.auth("root", roles=["admin"])


@pytest.fixture
async def seeded(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    bob: dict[str, str],
    admin: dict[str, str],
) -> dict[str, list[dict[str, Any]]]:
    """Three alice tasks, two bob tasks and one of the admin's own, interleaved in time."""
    tasks: dict[str, list[dict[str, Any]]] = {"alice": [], "bob": [], "root": []}
    for owner, auth in [
        ("alice", alice),
        ("bob", bob),
        ("alice", alice),
        ("root", admin),
        ("bob", bob),
        ("alice", alice),
    ]:
        tasks[owner].append(await create(client, auth, title=f"{owner} {len(tasks[owner])}"))
    return tasks


def ids(tasks: list[dict[str, Any]]) -> list[str]:
    return [task["id"] for task in tasks]


# --- users --------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "bob"])
async def test_user_lists_only_own_tasks(
    client: httpx.AsyncClient,
    oidc: OIDCProvider,
    seeded: dict[str, list[dict[str, Any]]],
    user: str,
) -> None:
    response = await client.get("/tasks", headers=oidc.auth(user))
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == len(seeded[user])
    assert [item["id"] for item in body["items"]] == ids(seeded[user])[::-1]


async def test_user_with_no_tasks_sees_none(
    client: httpx.AsyncClient, oidc: OIDCProvider, seeded: dict[str, list[dict[str, Any]]]
) -> None:
    response = await client.get("/tasks", headers=oidc.auth("carol"))
    assert response.status_code == 200
    assert response.json()["total"] == 0
    assert response.json()["items"] == []


async def test_user_status_filter_stays_within_own_tasks(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    mine = await client.post("/tasks", json={"title": "a", "status": "completed"}, headers=alice)
    await client.post("/tasks", json={"title": "b", "status": "completed"}, headers=bob)
    response = await client.get("/tasks", params={"status": "completed"}, headers=alice)
    assert response.status_code == 200
    assert response.json()["total"] == 1
    assert [item["id"] for item in response.json()["items"]] == [mine.json()["id"]]


async def test_task_is_owned_by_the_token_subject(
    client: httpx.AsyncClient, app: FastAPI, alice: dict[str, str], admin: dict[str, str]
) -> None:
    mine = await create(client, alice, title="mine")
    admins = await create(client, admin, title="admin's")
    assert (await db_row(app, mine["id"]) or {})["owner"] == "alice"
    assert (await db_row(app, admins["id"]) or {})["owner"] == "root"


async def test_other_users_task_is_not_found_on_get(
    client: httpx.AsyncClient,
    bob: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    for task in seeded["alice"] + seeded["root"]:
        response = await client.get(f"/tasks/{task['id']}", headers=bob)
        assert response.status_code == 404
        assert response.json() == NOT_FOUND
    # Indistinguishable from a task that does not exist at all.
    missing = await client.get(f"/tasks/{uuid.uuid4()}", headers=bob)
    assert missing.status_code == 404
    assert missing.json() == NOT_FOUND


@pytest.mark.parametrize(
    "change",
    [{"title": "hijacked"}, {"description": "x"}, {"status": "completed"}],
    ids=["title", "description", "status"],
)
async def test_other_users_task_is_not_found_on_patch_and_unchanged(
    client: httpx.AsyncClient,
    app: FastAPI,
    bob: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
    change: dict[str, Any],
) -> None:
    target = seeded["alice"][0]
    before = await db_row(app, target["id"])
    response = await client.patch(f"/tasks/{target['id']}", json=change, headers=bob)
    assert response.status_code == 404
    assert response.json() == NOT_FOUND
    assert await db_row(app, target["id"]) == before


async def test_user_cannot_delete_even_own_task(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    bob: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    count = await db_count(app)
    for auth, task in [(alice, seeded["alice"][0]), (bob, seeded["alice"][1])]:
        response = await client.delete(f"/tasks/{task['id']}", headers=auth)
        assert response.status_code == 403
        assert isinstance(response.json()["detail"], str)
        assert await db_row(app, task["id"]) is not None
    # Also 403, not 404, for a task that does not exist: the role check comes first.
    response = await client.delete(f"/tasks/{uuid.uuid4()}", headers=alice)
    assert response.status_code == 403
    assert await db_count(app) == count


async def test_user_may_name_themselves_as_owner(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    response = await client.get("/tasks", params={"owner": "alice"}, headers=alice)
    assert response.status_code == 200
    assert response.json()["total"] == 3
    assert [item["id"] for item in response.json()["items"]] == ids(seeded["alice"])[::-1]


@pytest.mark.parametrize("owner", ["bob", "root", "nobody", "ALICE"])
async def test_user_may_not_list_another_owner(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
    owner: str,
) -> None:
    response = await client.get("/tasks", params={"owner": owner}, headers=alice)
    assert response.status_code == 403
    assert isinstance(response.json()["detail"], str)
    assert "items" not in response.json()


# --- admins -------------------------------------------------------------------------------


async def test_admin_lists_all_tasks_newest_first(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    response = await client.get("/tasks", params={"page_size": 100}, headers=admin)
    assert response.status_code == 200
    body = response.json()
    everything = seeded["alice"] + seeded["bob"] + seeded["root"]
    assert body["total"] == len(everything) == 6
    listed = [item["id"] for item in body["items"]]
    assert sorted(listed) == sorted(ids(everything))
    titles = [item["title"] for item in body["items"]]
    assert titles == ["alice 2", "bob 1", "root 0", "alice 1", "bob 0", "alice 0"]


@pytest.mark.parametrize(("owner", "expected"), [("alice", 3), ("bob", 2), ("root", 1), ("x", 0)])
async def test_admin_filters_by_owner(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
    owner: str,
    expected: int,
) -> None:
    response = await client.get("/tasks", params={"owner": owner}, headers=admin)
    assert response.status_code == 200
    body = response.json()
    assert body["total"] == expected
    assert [item["id"] for item in body["items"]] == ids(seeded.get(owner, []))[::-1]


async def test_admin_owner_filter_combines_with_status_and_paging(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    alice: dict[str, str],
    bob: dict[str, str],
) -> None:
    done = []
    for n in range(3):
        made = await client.post(
            "/tasks", json={"title": f"a{n}", "status": "completed"}, headers=alice
        )
        done.append(made.json()["id"])
        await client.post("/tasks", json={"title": f"b{n}", "status": "completed"}, headers=bob)
        await client.post("/tasks", json={"title": f"p{n}"}, headers=alice)
    response = await client.get(
        "/tasks",
        params={"owner": "alice", "status": "completed", "page": 2, "page_size": 2},
        headers=admin,
    )
    assert response.status_code == 200
    assert response.json()["total"] == 3
    assert [item["id"] for item in response.json()["items"]] == [done[0]]


async def test_admin_reads_anyones_task(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    for task in seeded["alice"] + seeded["bob"]:
        response = await client.get(f"/tasks/{task['id']}", headers=admin)
        assert response.status_code == 200
        assert response.json() == task


async def test_admin_patches_anyones_task_without_taking_it_over(
    client: httpx.AsyncClient,
    app: FastAPI,
    admin: dict[str, str],
    bob: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    target = seeded["bob"][0]
    response = await client.patch(
        f"/tasks/{target['id']}",
        json={"title": "fixed by admin", "status": "in_progress"},
        headers=admin,
    )
    assert response.status_code == 200, response.text
    assert response.json()["title"] == "fixed by admin"
    row = await db_row(app, target["id"])
    assert row is not None
    assert (row["owner"], row["title"], row["status"]) == ("bob", "fixed by admin", "in_progress")
    # The owner still sees it, changed.
    seen = await client.get(f"/tasks/{target['id']}", headers=bob)
    assert seen.status_code == 200
    assert seen.json()["title"] == "fixed by admin"


async def test_admin_deletes_anyones_task(
    client: httpx.AsyncClient,
    app: FastAPI,
    admin: dict[str, str],
    bob: dict[str, str],
    seeded: dict[str, list[dict[str, Any]]],
) -> None:
    target = seeded["bob"][1]
    response = await client.delete(f"/tasks/{target['id']}", headers=admin)
    assert response.status_code == 204
    assert response.content == b""
    assert await db_row(app, target["id"]) is None
    assert await db_count(app) == 5
    gone = await client.get(f"/tasks/{target['id']}", headers=bob)
    assert gone.status_code == 404
    assert gone.json() == NOT_FOUND


async def test_admin_role_from_audience_client_roles(
    client: httpx.AsyncClient, oidc: OIDCProvider, seeded: dict[str, list[dict[str, Any]]]
) -> None:
    # Keycloak puts client roles under resource_access[<client id>].
    auth = oidc.auth("ops", roles=[], resource_access={AUDIENCE: {"roles": ["admin"]}})
    response = await client.get("/tasks", headers=auth)
    assert response.status_code == 200
    assert response.json()["total"] == 6


# --- no role ------------------------------------------------------------------------------

NO_ROLE_TOKENS: dict[str, dict[str, Any]] = {
    "no-roles": {"roles": []},
    "unrelated-role": {"roles": ["viewer", "manage-account"]},
    "role-of-another-client": {
        "roles": [],
        "resource_access": {"account": {"roles": ["admin", "user"]}},
    },
    "no-realm-access": {"roles": [], "realm_access": None},
    "case-differs": {"roles": ["User", "ADMIN"]},
}


@pytest.mark.parametrize("token", list(NO_ROLE_TOKENS), ids=list(NO_ROLE_TOKENS))
@pytest.mark.parametrize("method", ["POST", "LIST", "GET", "PATCH", "DELETE"])
async def test_token_without_user_or_admin_role_is_forbidden(
    client: httpx.AsyncClient,
    app: FastAPI,
    oidc: OIDCProvider,
    method: str,
    token: str,
) -> None:
    # The subject owns the task: even its own data is off limits without a role.
    owned = await create(client, oidc.auth("mallory"), title="mallory's")
    before = await db_row(app, owned["id"])
    count = await db_count(app)
    auth = oidc.auth("mallory", **NO_ROLE_TOKENS[token])
    path = f"/tasks/{owned['id']}"
    requests: dict[str, dict[str, Any]] = {
        "POST": {"method": "POST", "url": "/tasks", "json": {"title": "sneaky"}},
        "LIST": {"method": "GET", "url": "/tasks"},
        "GET": {"method": "GET", "url": path},
        "PATCH": {"method": "PATCH", "url": path, "json": {"title": "sneaky"}},
        "DELETE": {"method": "DELETE", "url": path},
    }
    response = await client.request(headers=auth, **requests[method])
    assert response.status_code == 403, response.text
    assert set(response.json()) == {"detail", "code"}
    assert isinstance(response.json()["detail"], str)
    assert await db_count(app) == count
    assert await db_row(app, owned["id"]) == before
