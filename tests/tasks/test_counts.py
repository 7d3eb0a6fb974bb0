"""`task_counts` (each project's tasks per status) and `task_assignments` (a row per task
and assignee), kept by the triggers of migration 0005 through every kind of change, and
the totals lists read from them."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from sqlalchemy import text

from tests.conftest import app_state
from tests.fixtures.projects import project, seen_by_directory, share

STATUSES = ("pending", "in_progress", "completed")


Key = tuple[str, str, str, str]


async def _counts(app: Any) -> tuple[dict[Key, int], dict[Key, int]]:
    """(what `task_counts` holds, what counting `tasks` gives), zeros left out: per tenant,
    project, assignee ('' for all the tasks) and status."""
    async with app_state(app).engine.connect() as connection:
        kept = await connection.execute(
            text(
                "SELECT owner, project_id::text, assignee, status, tasks FROM task_counts"
                " WHERE tasks <> 0"
            )
        )
        counted = await connection.execute(
            text(
                "SELECT owner, project_id::text, '', status, count(*) FROM tasks"
                " GROUP BY owner, project_id, status"
                " UNION ALL"
                " SELECT owner, project_id::text, assignee, status, count(*)"
                " FROM tasks, unnest(assignees) AS assignee"
                " GROUP BY owner, project_id, assignee, status"
            )
        )
        return (
            {(o, p, a, s): n for o, p, a, s, n in kept},
            {(o, p, a, s): n for o, p, a, s, n in counted},
        )


async def _assignments(app: Any) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    """(what `task_assignments` holds, what the tasks' assignees say)."""
    columns = "owner, {id}, {user}, project_id, status, created_at"
    async with app_state(app).engine.connect() as connection:
        kept = await connection.execute(
            text(f"SELECT {columns.format(id='task_id', user='user_id')} FROM task_assignments")
        )
        derived = await connection.execute(
            text(f"SELECT {columns.format(id='id', user='unnest(assignees)')} FROM tasks")
        )
        return {tuple(row) for row in kept}, {tuple(row) for row in derived}


async def _projects_counted(app: Any) -> set[str]:
    async with app_state(app).engine.connect() as connection:
        rows = await connection.execute(text("SELECT DISTINCT project_id::text FROM task_counts"))
        return {row[0] for row in rows}


async def test_counts_follow_every_change(client, app, oidc):
    alice, bob, carol = oidc.auth("alice"), oidc.auth("bob"), oidc.auth("carol")
    admin = oidc.auth("root", roles=["admin"])
    await seen_by_directory(client, alice, bob, carol)
    team = await project(client, alice, "Team")
    other = await project(client, bob, "Other")
    doomed = await project(client, carol, "Doomed")
    await share(client, alice, team, "bob", "editor")
    await share(client, alice, team, "carol", "editor")
    await share(client, bob, other, "alice", "editor")
    await share(client, carol, doomed, "alice", "editor")
    ids = []
    for n in range(6):
        for where in (None, team, other, doomed):
            body: dict[str, Any] = {"title": f"t{n}", "status": STATUSES[n % 3]}
            if where is not None:
                body["project_id"] = where
            response = await client.post("/tasks", json=body, headers=alice)
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    kept, counted = await _counts(app)
    assert kept == counted
    assert sum(n for (_, _, a, _), n in kept.items() if a == "") == 24
    assigned, derived = await _assignments(app)
    assert assigned == derived

    steps = [
        # assignees of a shared task, set and changed with its status
        client.patch(f"/tasks/{ids[1]}", json={"assignees": ["bob", "alice"]}, headers=alice),
        client.patch(
            f"/tasks/{ids[1]}", json={"assignees": ["carol"], "status": "pending"}, headers=alice
        ),
        client.patch(f"/tasks/{ids[2]}", json={"assignees": ["bob"]}, headers=alice),
        # a status, a title (no count changes), a move to another tenant's project and back
        client.patch(f"/tasks/{ids[1]}", json={"status": "completed"}, headers=alice),
        client.patch(f"/tasks/{ids[2]}", json={"title": "renamed"}, headers=alice),
        client.patch(f"/tasks/{ids[5]}", json={"project_id": other}, headers=alice),
        client.patch(
            f"/tasks/{ids[6]}", json={"project_id": team, "status": "pending"}, headers=alice
        ),
        client.delete(f"/tasks/{ids[9]}", headers=admin),
        # the whole project to another tenant, and one deleted with its tasks
        client.post(f"/projects/{team}/transfer", json={"owner": "bob"}, headers=alice),
        client.delete(f"/projects/{doomed}", headers=carol),
    ]
    for step in steps:
        response = await step
        assert response.status_code in (200, 204), response.text
        kept, counted = await _counts(app)
        assert kept == counted, response.request.url
        assigned, derived = await _assignments(app)
        assert assigned == derived, response.request.url
    # one deleted task, the deleted project's six
    assert sum(n for (_, _, a, _), n in kept.items() if a == "") == 24 - 1 - 6
    assert any(a == "carol" for (_, _, a, _) in kept)  # assignees are counted too
    assert doomed not in await _projects_counted(app)
    # The transfer left no counts under the old tenant.
    async with app_state(app).engine.connect() as connection:
        tenants = await connection.execute(
            text("SELECT DISTINCT owner FROM task_counts WHERE project_id = :p"), {"p": team}
        )
        assert [row[0] for row in tenants] == ["bob"]

    # Totals come from the counts: the list's and each status's.
    listed = (await client.get("/tasks?page_size=1", headers=alice)).json()["total"]
    assert listed == sum(n for (_, _, a, _), n in kept.items() if a == "")
    for status in STATUSES:
        total = (await client.get(f"/tasks?status={status}", headers=alice)).json()["total"]
        assert total == sum(n for (_, _, a, s), n in kept.items() if s == status and a == "")
    for user in ("bob", "carol"):
        total = (await client.get(f"/tasks?assignee={user}", headers=alice)).json()["total"]
        assert total == sum(n for (_, _, a, _), n in kept.items() if a == user)
        assert total > 0

    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks"))
    assert await _counts(app) == ({}, {})
    assert await _assignments(app) == (set(), set())


async def test_concurrent_changes_of_one_project_keep_exact_counts(client, app, oidc):
    """Status and assignee changes in opposite directions at once, creations and deletions
    among them:
    each statement writes its counts in key order, so none waits on another in a cycle
    (a deadlock would be a 500 here), and the counts stay exact."""
    alice, bob = oidc.auth("alice"), oidc.auth("bob")
    admin = oidc.auth("root", roles=["admin"])
    await seen_by_directory(client, alice, bob)
    team = await project(client, alice)
    await share(client, alice, team, "bob", "editor")
    ids = []
    for n in range(12):
        body: dict[str, Any] = {"title": f"t{n}", "project_id": team, "status": STATUSES[n % 3]}
        ids.append((await client.post("/tasks", json=body, headers=alice)).json()["id"])
    rng = random.Random(7)
    calls = []
    for n in range(120):
        who = alice if n % 2 else bob
        roll = rng.random()
        if roll < 0.2:
            assignees = rng.sample(["alice", "bob"], rng.randint(0, 2))
            body = {"assignees": assignees, "status": rng.choice(STATUSES)}
            calls.append(client.patch(f"/tasks/{rng.choice(ids)}", json=body, headers=who))
        elif roll < 0.8:
            status = rng.choice(STATUSES)
            calls.append(
                client.patch(f"/tasks/{rng.choice(ids)}", json={"status": status}, headers=who)
            )
        elif roll < 0.9:
            body = {"title": "more", "project_id": team, "status": rng.choice(STATUSES)}
            calls.append(client.post("/tasks", json=body, headers=who))
        else:
            calls.append(client.delete(f"/tasks/{rng.choice(ids)}", headers=admin))
    responses = await asyncio.gather(*calls)
    assert {r.status_code for r in responses} <= {200, 201, 204, 404}, [
        r.text for r in responses if r.status_code >= 500
    ]
    assert sum(r.status_code == 200 for r in responses) > 50
    kept, counted = await _counts(app)
    assert kept == counted
    assigned, derived = await _assignments(app)
    assert assigned == derived


async def test_a_tenant_change_within_one_partition_keeps_the_assignments(client, app, oidc):
    """alice and carol hash to the same partition: a task moving from one's project to the
    other's, and a transfer between them, are updates in place (no row movement), and the
    assignments follow them."""
    alice, carol = oidc.auth("alice"), oidc.auth("carol")
    await seen_by_directory(client, alice, carol)
    mine = await project(client, alice, "Mine")
    theirs = await project(client, carol, "Theirs")
    await share(client, alice, mine, "carol", "editor")
    await share(client, carol, theirs, "alice", "editor")
    ids = []
    for n in range(3):
        body = {"title": f"t{n}", "project_id": mine, "assignees": ["carol", "alice"]}
        response = await client.post("/tasks", json=body, headers=alice)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    async with app_state(app).engine.connect() as connection:
        partitions = await connection.execute(
            text(
                "SELECT DISTINCT tableoid::regclass::text FROM tasks"
                " WHERE owner IN ('alice', 'carol')"
            )
        )
        assert len(partitions.all()) == 1  # else this test would test row movement

    moved = await client.patch(f"/tasks/{ids[0]}", json={"project_id": theirs}, headers=alice)
    assert moved.status_code == 200, moved.text
    assert moved.json()["owner"] == "carol"
    assert moved.json()["assignees"] == ["carol", "alice"]
    transferred = await client.post(
        f"/projects/{mine}/transfer", json={"owner": "carol"}, headers=alice
    )
    assert transferred.status_code == 200, transferred.text
    assigned, derived = await _assignments(app)
    assert assigned == derived
    assert {row[0] for row in assigned} == {"carol"}
    kept, counted = await _counts(app)
    assert kept == counted
    listed = await client.get("/tasks?assignee=me", headers=alice)
    assert listed.json()["total"] == 3
    assert len(listed.json()["items"]) == 3
