"""Every request's statements run in autocommit, and each change is one statement: it
commits on its own, with no BEGIN and COMMIT round trips."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from tests.conftest import app_state


@contextmanager
def in_transaction_after_each_statement(engine: Any) -> Iterator[list[tuple[str, bool]]]:
    """(statement, whether the server connection was inside a transaction after it)."""
    seen: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "tasks" in statement or "events" in statement:
            asyncpg_connection = conn.connection.dbapi_connection._connection
            seen.append((statement.split()[0].upper(), asyncpg_connection.is_in_transaction()))

    event.listen(engine.sync_engine, "after_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", record)


async def test_each_change_is_one_statement_outside_a_transaction(client, app, oidc):
    alice, admin = oidc.auth("alice"), oidc.auth("root", roles=["admin"])
    with in_transaction_after_each_statement(app_state(app).engine) as seen:
        created = await client.post("/tasks", json={"title": "one"}, headers=alice)
        assert created.status_code == 201
    assert seen == [("INSERT", False)]

    task_id = created.json()["id"]
    with in_transaction_after_each_statement(app_state(app).engine) as seen:
        patched = await client.patch(f"/tasks/{task_id}", json={"title": "two"}, headers=alice)
        assert patched.status_code == 200
    assert seen == [("UPDATE", False)]

    with in_transaction_after_each_statement(app_state(app).engine) as seen:
        assert (await client.delete(f"/tasks/{task_id}", headers=admin)).status_code == 204
    assert seen == [("DELETE", False)]


async def test_reads_run_outside_a_transaction(client, app, oidc):
    alice = oidc.auth("alice")
    created = await client.post("/tasks", json={"title": "one"}, headers=alice)
    await app_state(app).cache.clear()  # the reads must reach the database
    with in_transaction_after_each_statement(app_state(app).engine) as seen:
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        task = await client.get(f"/tasks/{created.json()['id']}", headers=alice)
        assert task.status_code == 200
    assert [kind for kind, _ in seen] == ["SELECT", "SELECT"]  # a page (count included), a task
    assert not any(inside for _, inside in seen), seen
