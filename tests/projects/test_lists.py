"""Lists over several projects: one page merged from each project's newest tasks, with the
filters and the total of the whole list, read from the partitions of the projects' owners
alone."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text

from tests.conftest import app_state
from tests.fixtures.projects import project, seen_by_directory, share
from tests.tasks.test_partition_pruning import (
    PARTITION,
    THROUGH_AN_INDEX,
    _explain_generic,
    captured_statements,
)

OWNERS = [f"owner{n}" for n in range(10)]  # more tenants than a statement names one by one


async def _shared_world(client: Any, oidc: Any) -> dict[str, str]:
    """alice, a viewer of one project of each owner (10 tenants), with tasks of every
    status, made by several people, assigned to nobody, alice or someone else; and two in
    her Inbox. The projects by owner."""
    alice = oidc.auth("alice")
    await seen_by_directory(client, alice, oidc.auth("zed"))
    projects = {}
    for n, owner in enumerate(OWNERS):
        auth = oidc.auth(owner)
        projects[owner] = await project(client, auth, f"Project of {owner}")
        await share(client, auth, projects[owner], "alice", "viewer")
        await share(client, auth, projects[owner], "zed", "editor")
        for k in range(n % 4 + 1):
            body = {
                "title": f"{owner} {k}",
                "project_id": projects[owner],
                "status": ("pending", "in_progress", "completed")[k % 3],
                "assignees": [[], ["alice"], ["zed"], ["alice", "zed"]][(n + k) % 4],
            }
            maker = auth if k % 2 else oidc.auth("zed")
            response = await client.post("/tasks", json=body, headers=maker)
            assert response.status_code == 201, response.text
    for title in ("mine 1", "mine 2"):
        assert (
            await client.post("/tasks", json={"title": title}, headers=alice)
        ).status_code == 201
    # A project alice is not in: none of it may show.
    stranger = oidc.auth("stranger")
    hidden = await project(client, stranger, "Hidden")
    await client.post("/tasks", json={"title": "hidden", "project_id": hidden}, headers=stranger)
    return projects


async def _expected(app: Any, where: str, parameters: dict[str, Any]) -> list[str]:
    """Ids of alice's visible tasks matching `where`, newest first."""
    query = (
        "SELECT id FROM tasks WHERE project_id IN"
        " (SELECT project_id FROM project_members WHERE user_id = 'alice')"
        f" AND {where} ORDER BY created_at DESC, id DESC"
    )
    async with app_state(app).engine.connect() as connection:
        return [str(row[0]) for row in await connection.execute(text(query), parameters)]


async def _all_pages(client: Any, auth: dict[str, str], query: str, size: int) -> list[str]:
    ids: list[str] = []
    page = 1
    while True:
        response = await client.get(f"/tasks?{query}&page={page}&page_size={size}", headers=auth)
        assert response.status_code == 200, response.text
        body = response.json()
        ids += [item["id"] for item in body["items"]]
        if page * size >= body["total"]:
            assert len(ids) == body["total"]
            # A page past the end is empty and still counts.
            past = await client.get(
                f"/tasks?{query}&page={page + 1}&page_size={size}", headers=auth
            )
            assert past.json()["items"] == []
            assert past.json()["total"] == body["total"]
            return ids
        assert len(body["items"]) == size
        page += 1


async def test_pages_over_many_projects_merge_them_in_order(client, app, oidc):
    projects = await _shared_world(client, oidc)
    alice = oidc.auth("alice")
    cases = [
        ("status=pending", "status = 'pending'", {}),
        ("created_by=zed", "created_by = 'zed'", {}),
        ("assignee=none", "cardinality(assignees) = 0", {}),
        ("assignee=me", "assignees @> ARRAY['alice']::varchar[]", {}),
        ("assignee=zed", "assignees @> ARRAY['zed']::varchar[]", {}),
        (
            "status=completed&assignee=none",
            "status = 'completed' AND cardinality(assignees) = 0",
            {},
        ),
        (f"project={projects['owner3']}", "project_id = :p", {"p": uuid.UUID(projects["owner3"])}),
        ("owner=alice", "owner = 'alice'", {}),
        (
            f"project={projects['owner2']}&assignee=me&status=in_progress",
            "project_id = :p AND assignees @> ARRAY['alice']::varchar[] AND status = 'in_progress'",
            {"p": uuid.UUID(projects["owner2"])},
        ),
        (
            "assignee=me&status=pending",
            "assignees @> ARRAY['alice']::varchar[] AND status = 'pending'",
            {},
        ),
    ]
    everything = await _expected(app, "true", {})
    assert len(everything) == 25  # 23 in the shared projects, 2 in the Inbox
    for size in (1, 4, 10, 100):
        assert await _all_pages(client, alice, "x=1", size) == everything, size
    for query, where, parameters in cases:
        expected = await _expected(app, where, parameters)
        assert expected, query  # each case matches something, so the check can fail
        assert await _all_pages(client, alice, query, 3) == expected, query


async def test_a_list_over_several_projects_reads_their_tenants_partitions(client, app, oidc):
    """alice sees her Inbox and projects of bob and carol: three tenants, whose partitions
    are the only ones read, while the tasks of others fill the rest."""
    alice = oidc.auth("alice")
    await seen_by_directory(client, alice)
    for owner in ("bob", "carol"):
        auth = oidc.auth(owner)
        shared = await project(client, auth, f"Project of {owner}")
        await share(client, auth, shared, "alice", "editor")
        for n in range(3):
            body = {"title": f"{owner} {n}", "project_id": shared, "assignees": ["alice"]}
            assert (await client.post("/tasks", json=body, headers=auth)).status_code == 201
    for owner in ["alice", *OWNERS]:
        response = await client.post("/tasks", json={"title": owner}, headers=oidc.auth(owner))
        assert response.status_code == 201
    with captured_statements(app) as statements:
        for query in ("", "status=pending", "assignee=none", "assignee=me", "page=3&page_size=2"):
            assert (await client.get(f"/tasks?{query}", headers=alice)).status_code == 200
    pages = [(s, p) for s, p in statements if "page_keys" in s]
    assert len(pages) == 5
    async with app_state(app).engine.connect() as connection:
        partitions = "SELECT DISTINCT tableoid::regclass::text FROM tasks"
        theirs = {
            row[0]
            for row in await connection.execute(
                text(f"{partitions} WHERE owner IN ('alice', 'bob', 'carol')")
            )
        }
        everywhere = {row[0] for row in await connection.execute(text(partitions))}
    assert theirs < everywhere  # so that reading another partition would show
    for statement, parameters in pages:
        scans = await _explain_generic(app, statement, parameters)
        read = {relation for _, relation in scans if PARTITION.fullmatch(relation)}
        assert read, (statement, scans)
        assert read <= theirs, (statement, parameters, scans)
        assert all(node in THROUGH_AN_INDEX for node, _ in scans), (statement, scans)
