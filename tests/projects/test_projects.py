"""Shared work: Inboxes, projects, members and their roles, assignees, moves and transfers,
through the API against real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import FastAPI
from sqlalchemy import text

from taskapp.membership.models import inbox_id
from tests.conftest import app_state
from tests.fixtures.projects import project, seen_by_directory, share


async def _stored(app: FastAPI, task_id: str) -> dict[str, object]:
    async with app_state(app).engine.connect() as connection:
        row = (
            (
                await connection.execute(
                    text(
                        "SELECT tableoid::regclass::text AS partition, owner, project_id, assignees"
                        " FROM tasks WHERE id = :id"
                    ),
                    {"id": uuid.UUID(task_id)},
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


async def test_every_user_has_an_inbox_where_tasks_go_by_default(client, oidc):
    alice = oidc.auth("alice")
    created = (await client.post("/tasks", json={"title": "mine"}, headers=alice)).json()
    inbox = str(inbox_id("alice"))
    assert created["project_id"] == inbox
    assert created["created_by"] == "alice"
    assert created["owner"] == "alice"
    assert created["assignees"] == []

    listed = (await client.get("/projects", headers=alice)).json()
    assert listed["total"] == 1
    (item,) = listed["items"]
    assert item["id"] == inbox
    assert item["name"] == "Inbox"
    assert item["personal"] is True
    assert item["role"] == "admin"

    assert (await client.patch(f"/projects/{inbox}", json={"name": "Mine"}, headers=alice)).json()[
        "name"
    ] == "Mine"
    refusals = [
        await client.patch(f"/projects/{inbox}", json={"archived": True}, headers=alice),
        await client.delete(f"/projects/{inbox}", headers=alice),
        await client.put(f"/projects/{inbox}/members/bob", json={"role": "viewer"}, headers=alice),
        await client.post(f"/projects/{inbox}/transfer", json={"owner": "alice"}, headers=alice),
    ]
    await seen_by_directory(client, oidc.auth("bob"))
    refusals.append(
        await client.put(f"/projects/{inbox}/members/bob", json={"role": "viewer"}, headers=alice)
    )
    assert [r.json()["code"] for r in refusals] == ["personal_project"] * 3 + [
        "personal_project",
        "personal_project",
    ]
    # Assigning someone else in an Inbox: they cannot be a member of it.
    stranger = await client.post(
        "/tasks", json={"title": "x", "assignees": ["alice", "bob"]}, headers=alice
    )
    assert stranger.status_code == 422
    assert stranger.json()["detail"][0]["loc"] == ["body", "assignees", 1]
    mine = await client.post("/tasks", json={"title": "x", "assignees": ["alice"]}, headers=alice)
    assert mine.status_code == 201
    assert mine.json()["assignees"] == ["alice"]


async def test_a_shared_project_seen_and_changed_by_its_members(client, app, oidc):
    alice, bob, carol, dave = (oidc.auth(u) for u in ("alice", "bob", "carol", "dave"))
    await seen_by_directory(client, alice, bob, carol, dave)
    team = await project(client, alice, "Launch")
    await share(client, alice, team, "bob", "editor")  # by subject (= username here)
    await share(client, alice, team, "carol@example.com", "viewer")  # by e-mail

    members = (await client.get(f"/projects/{team}/members", headers=carol)).json()
    assert {(m["user"], m["role"], m["owner"]) for m in members} == {
        ("alice", "admin", True),
        ("bob", "editor", False),
        ("carol", "viewer", False),
    }
    assert members[1]["email"] == "bob@example.com"

    made = await client.post(
        "/tasks",
        json={"title": "ship it", "project_id": team, "assignees": ["carol", "bob", "carol"]},
        headers=bob,
    )
    assert made.status_code == 201, made.text
    task = made.json()
    # The tenant is the project's owner; a name given twice counts once.
    assert (task["owner"], task["created_by"], task["assignees"]) == (
        "alice",
        "bob",
        ["carol", "bob"],
    )
    stored = await _stored(app, task["id"])
    assert stored["owner"] == "alice"

    for viewer in (alice, bob, carol):
        assert (await client.get(f"/tasks/{task['id']}", headers=viewer)).status_code == 200
        page = (await client.get(f"/tasks?project={team}", headers=viewer)).json()
        assert [t["id"] for t in page["items"]] == [task["id"]]
    assert (await client.get("/tasks?assignee=me", headers=carol)).json()["total"] == 1
    assert (await client.get("/tasks?assignee=carol@example.com", headers=alice)).json()[
        "total"
    ] == 1
    assert (await client.get("/tasks?assignee=none", headers=alice)).json()["total"] == 0
    assert (await client.get("/tasks?created_by=me", headers=bob)).json()["total"] == 1
    assert (await client.get("/tasks?created_by=me", headers=alice)).json()["total"] == 0

    # Dave is in nothing: the project and its task do not exist for him.
    assert (await client.get(f"/tasks/{task['id']}", headers=dave)).status_code == 404
    assert (await client.get(f"/tasks?project={team}", headers=dave)).json()["code"] == (
        "project_not_found"
    )
    assert (await client.get("/tasks", headers=dave)).json()["total"] == 0

    # A viewer reads but does not change.
    refused = await client.patch(f"/tasks/{task['id']}", json={"title": "no"}, headers=carol)
    assert refused.status_code == 403
    changed = await client.patch(f"/tasks/{task['id']}", json={"status": "completed"}, headers=bob)
    assert changed.json()["status"] == "completed"
    assert (await client.get(f"/tasks/{task['id']}", headers=carol)).json()["status"] == "completed"


async def test_a_removed_member_loses_access_and_assignments_at_once(client, app, oidc):
    alice, bob, carol = (oidc.auth(u) for u in ("alice", "bob", "carol"))
    await seen_by_directory(client, alice, bob, carol)
    team = await project(client, alice)
    await share(client, alice, team, "bob", "editor")
    await share(client, alice, team, "carol", "editor")
    task = (
        await client.post(
            "/tasks",
            json={"title": "t", "project_id": team, "assignees": ["bob", "carol"]},
            headers=alice,
        )
    ).json()
    # Cached for bob, then he is removed: the cached answers must not outlive it.
    assert (await client.get(f"/tasks/{task['id']}", headers=bob)).status_code == 200
    assert (await client.get("/tasks", headers=bob)).json()["total"] == 1

    refused = await client.delete(f"/projects/{team}/members/carol", headers=bob)
    assert refused.status_code == 403  # only a project admin removes others
    owner = await client.delete(f"/projects/{team}/members/alice", headers=alice)
    assert owner.json()["code"] == "project_owner"
    assert (await client.delete(f"/projects/{team}/members/bob", headers=alice)).status_code == 204

    assert (await client.get(f"/tasks/{task['id']}", headers=bob)).status_code == 404
    assert (await client.get("/tasks", headers=bob)).json()["total"] == 0
    assert (await client.get(f"/projects/{team}", headers=bob)).status_code == 404
    assert (await _stored(app, task["id"]))["assignees"] == ["carol"]
    assert (await client.get(f"/tasks/{task['id']}", headers=carol)).json()["assignees"] == [
        "carol"
    ]
    # Anyone may leave.
    assert (
        await client.delete(f"/projects/{team}/members/carol", headers=carol)
    ).status_code == 204
    assert (await client.get(f"/tasks/{task['id']}", headers=carol)).status_code == 404
    again = await client.delete(f"/projects/{team}/members/carol", headers=alice)
    assert again.json()["code"] == "member_not_found"


async def test_a_task_moves_between_projects_and_partitions(client, app, oidc):
    alice, bob = oidc.auth("alice"), oidc.auth("bob")
    await seen_by_directory(client, alice, bob)
    ours = await project(client, alice, "Ours")
    theirs = await project(client, bob, "Theirs")
    await share(client, alice, ours, "bob", "editor")
    task = (
        await client.post(
            "/tasks",
            json={"title": "t", "project_id": ours, "assignees": ["bob", "alice"]},
            headers=alice,
        )
    ).json()
    before = await _stored(app, task["id"])

    # Alice is not a member of bob's project: it does not exist for her.
    missing = await client.patch(f"/tasks/{task['id']}", json={"project_id": theirs}, headers=alice)
    assert missing.json()["code"] == "project_not_found"
    await share(client, bob, theirs, "alice", "viewer")
    viewer = await client.patch(f"/tasks/{task['id']}", json={"project_id": theirs}, headers=alice)
    assert viewer.status_code == 403
    assert await _stored(app, task["id"]) == before
    await share(client, bob, theirs, "alice", "editor")
    moved = await client.patch(f"/tasks/{task['id']}", json={"project_id": theirs}, headers=alice)
    assert moved.status_code == 200, moved.text
    assert (moved.json()["owner"], moved.json()["project_id"]) == ("bob", theirs)
    after = await _stored(app, task["id"])
    assert after["owner"] == "bob"
    assert after["assignees"] == ["bob", "alice"]
    bob_inbox = (await client.post("/tasks", json={"title": "b"}, headers=bob)).json()["id"]
    assert after["partition"] == (await _stored(app, bob_inbox))["partition"]

    # Into alice's Inbox: bob is not a member there, so his assignment ends.
    home = await client.patch(
        f"/tasks/{task['id']}", json={"project_id": str(inbox_id("alice"))}, headers=alice
    )
    assert home.json()["owner"] == "alice"
    assert home.json()["assignees"] == ["alice"]
    assert (await client.get(f"/tasks/{task['id']}", headers=bob)).status_code == 404


async def test_transfer_moves_the_project_and_its_tasks(client, app, oidc):
    alice, bob, carol = (oidc.auth(u) for u in ("alice", "bob", "carol"))
    await seen_by_directory(client, alice, bob, carol)
    team = await project(client, alice)
    await share(client, alice, team, "bob", "viewer")
    task = (
        await client.post("/tasks", json={"title": "t", "project_id": team}, headers=alice)
    ).json()

    stranger = await client.post(
        f"/projects/{team}/transfer", json={"owner": "carol"}, headers=alice
    )
    assert stranger.status_code == 422
    assert stranger.json()["detail"][0]["loc"] == ["body", "owner"]
    unknown = await client.post(f"/projects/{team}/transfer", json={"owner": "zed"}, headers=alice)
    assert unknown.json()["code"] == "user_not_found"
    not_owner = await client.post(f"/projects/{team}/transfer", json={"owner": "bob"}, headers=bob)
    assert not_owner.status_code == 403

    done = await client.post(f"/projects/{team}/transfer", json={"owner": "bob"}, headers=alice)
    assert done.status_code == 200, done.text
    assert done.json()["owner"] == "bob"
    assert (await _stored(app, task["id"]))["owner"] == "bob"
    assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()["owner"] == "bob"
    roles = {
        m["user"]: (m["role"], m["owner"])
        for m in (await client.get(f"/projects/{team}/members", headers=alice)).json()
    }
    assert roles == {"alice": ("admin", False), "bob": ("admin", True)}
    # Now bob owns it: alice (still an admin) may not delete it; bob may, with its tasks.
    assert (await client.delete(f"/projects/{team}", headers=alice)).status_code == 403
    assert (await client.delete(f"/projects/{team}", headers=bob)).status_code == 204
    assert (await client.get(f"/tasks/{task['id']}", headers=bob)).status_code == 404
    assert (await client.get(f"/projects/{team}", headers=bob)).status_code == 404


async def test_archived_projects_take_no_new_tasks(client, oidc):
    alice = oidc.auth("alice")
    team = await project(client, alice)
    archived = await client.patch(f"/projects/{team}", json={"archived": True}, headers=alice)
    assert archived.json()["archived"] is True
    refused = await client.post("/tasks", json={"title": "t", "project_id": team}, headers=alice)
    assert refused.json()["code"] == "project_archived"
    await client.patch(f"/projects/{team}", json={"archived": False}, headers=alice)
    assert (
        await client.post("/tasks", json={"title": "t", "project_id": team}, headers=alice)
    ).status_code == 201


async def test_admins_see_every_project_and_filter_by_member(client, oidc):
    alice, bob, root = oidc.auth("alice"), oidc.auth("bob"), oidc.auth("root", roles=["admin"])
    await seen_by_directory(client, alice, bob)
    await project(client, alice, "A")
    await project(client, bob, "B")
    everyone = (await client.get("/projects?page_size=100", headers=root)).json()
    assert {p["name"] for p in everyone["items"]} >= {"A", "B", "Inbox"}
    alices = (await client.get("/projects?member=alice", headers=root)).json()
    assert {p["name"] for p in alices["items"]} == {"A", "Inbox"}
    assert (await client.get("/projects?member=bob", headers=alice)).status_code == 403


async def test_bad_input_is_a_422_and_changes_nothing(client, oidc):
    alice = oidc.auth("alice")
    bad_new: list[dict[str, object]] = [
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 256},
        {"name": "a\x00b"},
        {},
    ]
    for body in bad_new:
        assert (await client.post("/projects", json=body, headers=alice)).status_code == 422
    team = await project(client, alice)
    bad_changes: list[dict[str, object]] = [{}, {"name": None}, {"archived": None}, {"owner": "x"}]
    for body in bad_changes:
        assert (
            await client.patch(f"/projects/{team}", json=body, headers=alice)
        ).status_code == 422
    wrong_role = await client.put(
        f"/projects/{team}/members/alice", json={"role": "owner"}, headers=alice
    )
    assert wrong_role.status_code == 422
    assert (await client.get("/projects/not-a-uuid", headers=alice)).status_code == 422
    assert (await client.get("/tasks?project=nope", headers=alice)).status_code == 422
    assert (await client.get("/projects", headers=alice)).json()["total"] == 2  # Inbox, team


async def test_a_callers_memberships_are_read_once_per_version_of_their_view(client, app, oidc):
    """A cache miss needs the caller's projects; a process reads them again only after a
    change to the caller's view (any change of their memberships is one)."""
    alice, bob = oidc.auth("alice"), oidc.auth("bob")
    await seen_by_directory(client, alice, bob)
    made = (await client.post("/tasks", json={"title": "t"}, headers=alice)).json()
    statements: list[str] = []

    def capture(statement: str, arguments: object, in_transaction: bool) -> None:
        statements.append(statement)

    def memberships_read() -> int:
        return sum(s.startswith("SELECT project_members.project_id") for s in statements)

    with app_state(app).database.observing(capture):
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        assert (await client.get("/tasks?page_size=3", headers=alice)).status_code == 200
        assert (await client.get(f"/tasks/{made['id']}", headers=alice)).status_code == 200
        assert memberships_read() == 1
        # A new project of hers is in her view at once, and so in what she may read.
        team = await project(client, alice)
        assert (await client.get(f"/tasks?project={team}", headers=alice)).status_code == 200
        assert memberships_read() == 2
        # Shared with bob, it is his to read at once; taken back, it is gone at once.
        assert (await client.get("/tasks", headers=bob)).json()["total"] == 0
        await share(client, alice, team, "bob", "viewer")
        assert (await client.get(f"/tasks?project={team}", headers=bob)).status_code == 200
        await client.delete(f"/projects/{team}/members/bob", headers=alice)
        gone = await client.get(f"/tasks?project={team}", headers=bob)
        assert gone.json()["code"] == "project_not_found"


async def test_a_transfer_waits_for_a_task_being_created_in_the_project(client, app, oidc):
    """A task created while its project is transferred lands with the project's new owner:
    a creator holds the project as it reads its owner, and the transfer waits for it."""
    alice, bob = oidc.auth("alice"), oidc.auth("bob")
    await seen_by_directory(client, alice, bob)
    team = await project(client, alice)
    await share(client, alice, team, "bob", "editor")
    racing = uuid.uuid4()
    async with app_state(app).engine.connect() as connection:
        # What TaskService.create does in its transaction, stopped before its commit.
        creating = await connection.begin()
        owner = await connection.scalar(
            text("SELECT owner FROM projects WHERE id = :id FOR SHARE"), {"id": team}
        )
        await connection.execute(
            text(
                "INSERT INTO tasks (owner, id, project_id, created_by, title)"
                " VALUES (:owner, :id, :project, 'bob', 'racing')"
            ),
            {"owner": owner, "id": racing, "project": team},
        )
        transfer = asyncio.create_task(
            client.post(f"/projects/{team}/transfer", json={"owner": "bob"}, headers=alice)
        )
        await asyncio.sleep(0.5)
        assert not transfer.done()  # waiting for the creator
        await creating.commit()
    done = await asyncio.wait_for(transfer, 10)
    assert done.status_code == 200, done.text
    assert (await _stored(app, str(racing)))["owner"] == "bob"
