"""A user's list, lookups and changes touch exactly one partition, through an index.

The partitions a caller may read are those of the owners of their projects, which the
statement reads from `project_members` as it runs: PostgreSQL prunes the others when it
executes the plan (they show as never executed), so the plans are read with ANALYZE.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tests.conftest import app_state
from tests.fixtures.projects import project, seen_by_directory, share

PARTITION = re.compile(r"tasks_p\d+")
# Scans that read a table through one of its indexes (a bitmap heap scan reads the rows a
# bitmap index scan below it found; the planner picks it over an index scan by statistics).
THROUGH_AN_INDEX = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}


@contextmanager
def captured_statements(app: Any) -> Iterator[list[tuple[str, Sequence[Any]]]]:
    """The SQL the service really sends to the primary, with its arguments."""
    statements: list[tuple[str, Sequence[Any]]] = []

    def capture(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        statements.append((statement, arguments))

    with app_state(app).database.observing(capture):
        yield statements


def _relations(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) for every scan node an EXPLAIN (ANALYZE, FORMAT JSON) plan ran."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if node.get("Actual Loops") == 0:
            continue  # pruned at execution
        if "Relation Name" in node and "Scan" in node["Node Type"]:
            found.append((node["Node Type"], node["Relation Name"]))
        stack.extend(node.get("Plans", []))
    return found


async def _explain(app: Any, statement: str, arguments: Sequence[Any]) -> list[tuple[str, str]]:
    async with app_state(app).database.pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            # Tiny test tables would make a sequential scan cheapest; does an index serve?
            await connection.execute("SET LOCAL enable_seqscan = off")
            await connection.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            raw = await connection.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, *arguments
            )
        finally:
            await transaction.rollback()  # an UPDATE ran: undo it
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return _relations(plan)


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):  # of ids or names: no commas, quotes or braces
        return "'{" + ",".join(str(item) for item in value) + "}'"
    return "'" + str(value).replace("'", "''") + "'"


async def _explain_generic(
    app: Any, statement: str, arguments: Sequence[Any]
) -> list[tuple[str, str]]:
    """The scans that the generic plan (what the API runs) executes, pruned ones left out."""
    async with app_state(app).database.pool.acquire() as connection:
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute("SET LOCAL enable_seqscan = off")
            await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await connection.execute(f"PREPARE probe AS {statement}")
            values = ", ".join(_literal(value) for value in arguments)
            raw = await connection.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE probe({values})"
            )
        finally:
            await transaction.rollback()  # the UPDATE ran: undo it
        await connection.execute("DEALLOCATE probe")  # it outlives the transaction
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return _relations(plan)


async def test_user_queries_hit_one_partition_through_an_index(client, app, oidc):
    user = oidc.auth("alice")
    for owner in ("alice", "bob", "carol", "dave", "erin"):
        for n in range(3):
            response = await client.post(
                "/tasks", json={"title": f"{owner} {n}"}, headers=oidc.auth(owner)
            )
            assert response.status_code == 201
    task_id = (await client.get("/tasks", headers=user)).json()["items"][0]["id"]

    with captured_statements(app) as statements:
        assert (await client.get("/tasks?page=1&page_size=2", headers=user)).status_code == 200
        assert (await client.get("/tasks?status=pending", headers=user)).status_code == 200
        assert (await client.get(f"/tasks/{task_id}", headers=user)).status_code == 200
        patched = await client.patch(
            f"/tasks/{task_id}", json={"status": "completed"}, headers=user
        )
        assert patched.status_code == 200

    queries = [(s, p) for s, p in statements if "tasks" in s and "EXPLAIN" not in s]
    kinds = {s.split()[0].upper() for s, _ in queries}
    assert kinds == {"SELECT", "UPDATE"}, queries
    assert len(queries) == 4  # a page (count included) twice, get, update
    for statement, parameters in queries:
        for explain in (_explain, _explain_generic):
            scans = await explain(app, statement, parameters)
            partitions = {relation for _, relation in scans if PARTITION.fullmatch(relation)}
            # The change by id names the tenants of the caller's projects as this process
            # last read them (for the reads above), so it is pruned as well.
            assert len(partitions) == 1, (explain.__name__, statement, scans)
            assert all(
                node in THROUGH_AN_INDEX for node, relation in scans if relation != "users"
            ), (
                explain.__name__,
                statement,
                scans,
            )


async def test_admin_lookup_by_id_uses_the_id_index(client, app, oidc):
    created = await client.post("/tasks", json={"title": "x"}, headers=oidc.auth("alice"))
    admin = oidc.auth("root", roles=["admin"])
    with captured_statements(app) as statements:
        response = await client.get(f"/tasks/{created.json()['id']}", headers=admin)
        assert response.status_code == 200
    statement, parameters = next((s, p) for s, p in statements if "FROM tasks" in s)
    scans = await _explain(app, statement, parameters)
    # No owner to prune by: every partition is probed, each through its id index.
    assert {relation for _, relation in scans} == {f"tasks_p{i}" for i in range(8)}
    assert all(node in THROUGH_AN_INDEX for node, _ in scans), scans


async def test_the_api_plans_statements_once_per_connection(app):
    async with app_state(app).database.pool.acquire() as connection:
        assert await connection.fetchval("SHOW plan_cache_mode") == "force_generic_plan"


async def test_admin_pages_carry_their_bounds_in_the_sql(client, app, oidc):
    """Across all owners a generic plan made without LIMIT reads the whole table, so the
    page bounds are written into the statement and the planner sees them."""
    admin = oidc.auth("root", roles=["admin"])
    with captured_statements(app) as statements:
        assert (await client.get("/tasks?page=3&page_size=7", headers=admin)).status_code == 200
        owned = await client.get("/tasks?page=3&page_size=7&owner=alice", headers=admin)
        assert owned.status_code == 200
    pages = [s for s, _ in statements if "page_keys" in s]
    assert len(pages) == 2
    assert "LIMIT 7 OFFSET 14" in pages[0]
    assert "LIMIT $" in pages[1]  # one owner: bound parameters, one prepared statement


async def test_a_change_by_id_not_among_the_tenants_last_read_looks_everywhere(client, app, oidc):
    """The tenants a change looks among first are a guess (what this process last read of
    the caller's projects): a task of a project joined since is still found and changed, and
    a stale guess gives nobody a task that is not theirs to change."""
    alice, bob, carol = oidc.auth("alice"), oidc.auth("bob"), oidc.auth("carol")
    await seen_by_directory(client, alice, bob, carol)
    mine = (await client.post("/tasks", json={"title": "mine"}, headers=alice)).json()
    assert (await client.get("/tasks", headers=alice)).json()["total"] == 1  # kept: her Inbox
    team = await project(client, bob)
    made = await client.post("/tasks", json={"title": "theirs", "project_id": team}, headers=bob)
    theirs = made.json()
    await share(client, bob, team, "alice", "editor")

    updates: list[bool] = []  # for each UPDATE: whether it named owners

    def capture(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        if statement.startswith("UPDATE tasks"):
            updates.append("tasks.owner = $" in statement)

    async def patch(auth: dict[str, str], task: dict[str, Any], title: str) -> Any:
        updates.clear()
        return await client.patch(f"/tasks/{task['id']}", json={"title": title}, headers=auth)

    with app_state(app).database.observing(capture):
        changed = await patch(alice, theirs, "one")
        assert changed.status_code == 200, changed.text
        assert changed.json()["title"] == "one"
        assert updates == [True, False]  # among alice's tenants (not found), then everywhere
        # The guess proved stale: it is dropped until a read keeps her projects again.
        assert (await patch(alice, theirs, "two")).json()["title"] == "two"
        assert updates == [False]
        assert (await client.get("/tasks", headers=alice)).json()["total"] == 2
        assert (await patch(alice, theirs, "ours")).json()["title"] == "ours"
        assert updates == [True]
        assert (await patch(alice, mine, "m")).json()["title"] == "m"
        assert updates == [True]

        # Removed from the team, she keeps the guess that names bob's partition: refused.
        gone = await client.delete(f"/projects/{team}/members/alice", headers=bob)
        assert gone.status_code == 204
        refused = await patch(alice, theirs, "x")
        assert refused.status_code == 404, refused.text
        assert refused.json()["code"] == "task_not_found"
        assert updates == [True, False]

        # A viewer whose guess names the task's partition: 403, and a stranger's task: 404.
        await share(client, bob, team, "carol", "viewer")
        assert (await client.get("/tasks", headers=carol)).json()["total"] == 1
        viewer = await patch(carol, theirs, "x")
        assert viewer.status_code == 403, viewer.text
        assert updates == [True, False]
        stranger = await patch(carol, mine, "x")
        assert stranger.status_code == 404
        assert updates == [True, False]

    assert (await client.get(f"/tasks/{theirs['id']}", headers=bob)).json()["title"] == "ours"
    assert (await client.get(f"/tasks/{mine['id']}", headers=alice)).json()["title"] == "m"
