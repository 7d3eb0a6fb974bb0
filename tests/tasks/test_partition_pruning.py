"""A user's list and lookups touch exactly one partition, through an index."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from tests.conftest import app_state

PARTITION = re.compile(r"tasks_p\d+")


@contextmanager
def captured_statements(engine: Any) -> Iterator[list[tuple[str, Any]]]:
    """The SQL the service really sends, with its parameters."""
    statements: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)


def _relations(plan: Any) -> list[tuple[str, str]]:
    """(node type, relation) for every scan node in an EXPLAIN (FORMAT JSON) plan."""
    found = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if "Relation Name" in node and "Scan" in node["Node Type"]:
            found.append((node["Node Type"], node["Relation Name"]))
        stack.extend(node.get("Plans", []))
    return found


async def _explain(engine: Any, statement: str, parameters: Any) -> list[tuple[str, str]]:
    async with engine.connect() as connection:
        # Tiny test tables would make a sequential scan cheapest; ask whether an index serves.
        await connection.exec_driver_sql("SET enable_seqscan = off")
        result = await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)
        raw = result.scalar()
        await connection.rollback()
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    return _relations(plan)


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def _explain_generic(engine: Any, statement: str, parameters: Any) -> list[tuple[str, str]]:
    """The scans that the generic plan (what the API runs) executes, pruned ones left out."""
    async with engine.connect() as connection:
        await connection.exec_driver_sql("SET enable_seqscan = off")
        await connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        await connection.exec_driver_sql(f"PREPARE probe AS {statement}")
        arguments = ", ".join(_literal(value) for value in parameters)
        result = await connection.exec_driver_sql(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE probe({arguments})"
        )
        raw = result.scalar()
        await connection.rollback()  # the UPDATE ran: undo it
        await connection.exec_driver_sql("DEALLOCATE probe")  # it outlives the transaction
        await connection.rollback()
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

    engine = app_state(app).engine
    with captured_statements(engine) as statements:
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
            scans = await explain(engine, statement, parameters)
            partitions = {relation for _, relation in scans if PARTITION.fullmatch(relation)}
            assert len(partitions) == 1, (explain.__name__, statement, scans)
            assert all("Index" in node for node, _ in scans), (explain.__name__, statement, scans)


async def test_admin_lookup_by_id_uses_the_id_index(client, app, oidc):
    created = await client.post("/tasks", json={"title": "x"}, headers=oidc.auth("alice"))
    admin = oidc.auth("root", roles=["admin"])
    with captured_statements(app_state(app).engine) as statements:
        response = await client.get(f"/tasks/{created.json()['id']}", headers=admin)
        assert response.status_code == 200
    statement, parameters = next((s, p) for s, p in statements if "FROM tasks" in s)
    scans = await _explain(app_state(app).engine, statement, parameters)
    # No owner to prune by: every partition is probed, each through its id index.
    assert {relation for _, relation in scans} == {f"tasks_p{i}" for i in range(8)}
    assert all("Index" in node for node, _ in scans), scans


async def test_the_api_plans_statements_once_per_connection(app):
    async with app_state(app).engine.connect() as connection:
        mode = await connection.exec_driver_sql("SHOW plan_cache_mode")
        assert mode.scalar() == "force_generic_plan"


async def test_admin_pages_carry_their_bounds_in_the_sql(client, app, oidc):
    """Across all owners a generic plan made without LIMIT reads the whole table, so the
    page bounds are written into the statement and the planner sees them."""
    admin = oidc.auth("root", roles=["admin"])
    with captured_statements(app_state(app).engine) as statements:
        assert (await client.get("/tasks?page=3&page_size=7", headers=admin)).status_code == 200
        owned = await client.get("/tasks?page=3&page_size=7&owner=alice", headers=admin)
        assert owned.status_code == 200
    pages = [s for s, _ in statements if "page_keys" in s]
    assert len(pages) == 2
    assert "LIMIT 7 OFFSET 14" in pages[0]
    assert "LIMIT $" in pages[1]  # one owner: bound parameters, one prepared statement
