"""Reads run without BEGIN/COMMIT round trips; writes stay in one transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event


@contextmanager
def in_transaction_after_each_statement(engine: Any) -> Iterator[list[tuple[str, bool]]]:
    """(statement, whether the server connection was inside a transaction after it)."""
    seen: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "tasks" in statement or "notifications" in statement:
            asyncpg_connection = conn.connection.dbapi_connection._connection
            seen.append((statement.split()[0].upper(), asyncpg_connection.is_in_transaction()))

    event.listen(engine.sync_engine, "after_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", record)


async def test_reads_run_outside_a_transaction_and_writes_inside_one(client, app, oidc):
    alice = oidc.auth("alice")
    with in_transaction_after_each_statement(app.state.engine) as seen:
        created = await client.post("/tasks", json={"title": "one"}, headers=alice)
        assert created.status_code == 201
        task_id = created.json()["id"]
        patched = await client.patch(f"/tasks/{task_id}", json={"title": "two"}, headers=alice)
        assert patched.status_code == 200
    writes = list(seen)
    assert {kind for kind, _ in writes} >= {"INSERT", "UPDATE"}
    assert all(inside for _, inside in writes), writes

    await app.state.cache.clear()  # the reads must reach the database
    with in_transaction_after_each_statement(app.state.engine) as seen:
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        assert (await client.get(f"/tasks/{task_id}", headers=alice)).status_code == 200
    assert len(seen) >= 2  # a page (count included), one task
    assert not any(inside for _, inside in seen), seen
