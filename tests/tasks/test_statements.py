"""Every request's statements run in autocommit, and each change is one statement: it
commits on its own, with no BEGIN and COMMIT round trips."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import text

from taskapp.app import create_app
from taskapp.database.driver import compilations
from tests.conftest import SettingsFactory, app_state, running

# A broker nobody listens on: the events are recorded, their hand-off fails quietly.
UNREACHABLE = "redis://127.0.0.1:9/0"


@contextmanager
def in_transaction_after_each_statement(app: Any) -> Iterator[list[tuple[str, bool]]]:
    """(statement, whether the server connection was inside a transaction after it)."""
    seen: list[tuple[str, bool]] = []

    def record(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        if "tasks" in statement or "events" in statement:
            # What the statement does after its CTEs (a create makes the Inbox in CTEs).
            verb = statement.split()[0].upper()
            if verb == "WITH":
                verb = next(v for v in ("INSERT INTO tasks", "UPDATE tasks") if v in statement)
            seen.append((verb.split()[0], in_transaction))

    with app_state(app).database.observing(record):
        yield seen


async def test_each_change_is_one_statement_outside_a_transaction(client, app, oidc):
    alice, admin = oidc.auth("alice"), oidc.auth("root", roles=["admin"])
    with in_transaction_after_each_statement(app) as seen:
        created = await client.post("/tasks", json={"title": "one"}, headers=alice)
        assert created.status_code == 201
    assert seen == [("INSERT", False)]

    task_id = created.json()["id"]
    with in_transaction_after_each_statement(app) as seen:
        patched = await client.patch(f"/tasks/{task_id}", json={"title": "two"}, headers=alice)
        assert patched.status_code == 200
    assert seen == [("UPDATE", False)]

    with in_transaction_after_each_statement(app) as seen:
        assert (await client.delete(f"/tasks/{task_id}", headers=admin)).status_code == 204
    assert seen == [("DELETE", False)]


async def test_reads_run_outside_a_transaction(client, app, oidc):
    alice = oidc.auth("alice")
    created = await client.post("/tasks", json={"title": "one"}, headers=alice)
    await app_state(app).cache.clear()  # the reads must reach the database
    with in_transaction_after_each_statement(app) as seen:
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        task = await client.get(f"/tasks/{created.json()['id']}", headers=alice)
        assert task.status_code == 200
    assert [kind for kind, _ in seen] == ["SELECT", "SELECT"]  # a page (count included), a task
    assert not any(inside for _, inside in seen), seen


async def test_every_statement_is_compiled_once_then_taken_from_the_cache(
    make_settings: SettingsFactory, oidc
):
    """Compiling a statement costs more than running it: each the API sends, a create with
    its events included, is built and compiled once, and found compiled after."""
    app = create_app(make_settings(notifications={"enabled": True}, broker_url=UNREACHABLE))
    kinds: list[str] = []

    def record(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        if "tasks" in statement:
            kinds.append(statement.split()[0].upper())

    async with running(app) as client:
        alice, admin = oidc.auth("alice"), oidc.auth("root", roles=["admin"])

        async def every_kind(n: int) -> None:
            created = await client.post("/tasks", json={"title": f"t{n}"}, headers=alice)
            assert created.status_code == 201, created.text
            task = created.json()["id"]
            await app_state(app).cache.clear()  # the reads must reach the database
            assert (await client.get("/tasks", headers=alice)).status_code == 200
            assert (await client.get(f"/tasks/{task}", headers=alice)).status_code == 200
            changed = await client.patch(
                f"/tasks/{task}", json={"status": "completed"}, headers=alice
            )
            assert changed.status_code == 200
            assert (await client.delete(f"/tasks/{task}", headers=admin)).status_code == 204

        await every_kind(0)  # compiled here, if not by an earlier test
        compiled = compilations()
        with app_state(app).database.observing(record):
            await every_kind(1)
            await every_kind(2)
        assert compilations() == compiled
        # The shared app's cleanup knows nothing of this app's events: no test after this
        # one may find them.
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE events, deliveries"))
    assert kinds == ["WITH", "SELECT", "SELECT", "UPDATE", "DELETE"] * 2
