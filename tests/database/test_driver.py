"""Statements on asyncpg: compiled once into asyncpg's SQL with their parameters in order and
their types' bind processing, run on the requests' pool, timed and counted; connections
come back from a request with no transaction left open; asyncpg's failures are outages (503)
only when the database cannot serve."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import asyncpg
import pytest
from sqlalchemy import Integer, Table, bindparam, insert, literal_column, select, text

from taskapp.config import DatabaseSettings
from taskapp.database.driver import compiled
from taskapp.database.outages import DatabaseUnavailableError, unavailable
from taskapp.database.servers import DatabaseServer, server_connection
from taskapp.events.models import Event
from taskapp.tasks.models import Task
from tests.conftest import SettingsFactory
from tests.fixtures.metrics import sample

TASKS = cast(Table, Task.__table__)
EVENTS = cast(Table, Event.__table__)


@pytest.fixture
def database(make_settings: SettingsFactory) -> DatabaseSettings:
    return make_settings(database={"pool_size": 1, "max_overflow": 0}).database


@pytest.fixture
async def server(database: DatabaseSettings) -> AsyncIterator[DatabaseServer]:
    server = await DatabaseServer.open(database)
    yield server
    await server.aclose()


def test_parameters_are_numbered_in_order_and_a_repeated_name_is_sent_once():
    statement = select(TASKS.c.id).where(
        TASKS.c.owner == bindparam("owner"),
        TASKS.c.title == bindparam("title"),
        TASKS.c.description == bindparam("owner"),
    )
    plan = compiled(statement)
    assert plan.names == ("owner", "title")
    assert "tasks.owner = $1::VARCHAR" in plan.sql
    assert "tasks.title = $2::VARCHAR" in plan.sql
    assert "tasks.description = $1" in plan.sql
    assert plan.arguments({"title": "t", "owner": "o"}) == ["o", "t"]
    assert plan.operation == "select"
    assert compiled(statement) is plan  # once per statement object


def test_a_missing_value_is_named_and_a_value_in_the_statement_is_used():
    statement = select(TASKS.c.id).where(
        TASKS.c.owner == bindparam("owner"), TASKS.c.title == "fixed"
    )
    plan = compiled(statement)
    with pytest.raises(KeyError, match="owner"):
        plan.arguments({})
    assert plan.arguments({"owner": "o"}) == ["o", "fixed"]


def test_integers_bound_as_literals_are_written_into_the_sql_and_nothing_else_is():
    statement = (
        select(TASKS.c.id)
        .limit(bindparam("limit", type_=Integer, literal_execute=True))
        .where(TASKS.c.owner == bindparam("owner"))
    )
    plan = compiled(statement)
    assert plan.names == ("owner",)
    assert "LIMIT 7" in plan.text({"limit": 7, "owner": "o"})
    with pytest.raises(TypeError, match="must be an int"):
        plan.text({"limit": "7; DROP TABLE tasks", "owner": "o"})
    with pytest.raises(TypeError, match="only integers"):
        compiled(select(TASKS.c.id).where(TASKS.c.owner == bindparam("o", literal_execute=True)))


def test_a_value_only_python_would_compute_is_refused():
    # tasks.id has a Python-side default (uuid4): SQLAlchemy's execution layer would fill it.
    with pytest.raises(TypeError, match="binds every value"):
        compiled(insert(TASKS).values(owner="o", title="t"))
    # A value computed at each execution would be frozen at the first one.
    with pytest.raises(TypeError, match="per execution"):
        compiled(select(TASKS.c.id).where(TASKS.c.owner == bindparam("o", callable_=str)))


async def test_json_is_serialized_as_sqlalchemy_would_and_stored(server: DatabaseServer):
    event_id = uuid.uuid4()
    payload = {"title": "ü", "n": [1, 2]}
    statement = (
        insert(EVENTS)
        .values(
            id=bindparam("id"),
            kind="test",
            aggregate_id=bindparam("id"),
            owner="driver-test",
            actor="driver-test",
            payload=bindparam("payload"),
        )
        .returning(EVENTS.c.payload)
    )
    try:
        async with server_connection(server) as connection:
            [row] = await connection.fetch(statement, {"id": event_id, "payload": payload})
            stored = await connection.raw.fetchval(
                "SELECT payload FROM events WHERE id = $1", event_id
            )
    finally:
        async with server_connection(server) as connection:
            await connection.raw.execute("DELETE FROM events WHERE id = $1", event_id)
    assert json.loads(row["payload"]) == payload  # rows come back as asyncpg returns them
    assert json.loads(stored) == payload


async def test_statements_are_timed_and_failures_counted(server: DatabaseServer):
    before = sample("db_query_latency_seconds_count", operation="select")
    failures = sample("db_errors_total", error="UndefinedColumnError")
    async with server_connection(server) as connection:
        assert [tuple(r) for r in await connection.fetch(select(literal_column("1")))] == [(1,)]
        with pytest.raises(Exception, match="no_such_column"):
            await connection.fetch(text("SELECT no_such_column"))
    assert sample("db_query_latency_seconds_count", operation="select") == before + 1
    assert sample("db_errors_total", error="UndefinedColumnError") == failures + 1


async def test_echo_logs_every_statement(make_settings: SettingsFactory, caplog):
    server = await DatabaseServer.open(make_settings(database={"echo": True}).database)
    try:
        with caplog.at_level(logging.INFO, logger="taskapp.database.driver"):
            async with server_connection(server) as connection:
                await connection.fetch(text("SELECT :n + 1"), {"n": 41})
    finally:
        await server.aclose()
    assert any("SELECT $1 + 1 (41,)" in record.getMessage() for record in caplog.records)


async def test_a_connection_comes_back_with_no_transaction_left_open(server: DatabaseServer):
    """A request cancelled inside a transaction: the next one on the same connection (the
    pool has one) runs outside any transaction, and nothing of the first was kept."""
    owner = f"driver-{uuid.uuid4()}"
    started = asyncio.Event()

    async def cancelled_inside_a_transaction() -> None:
        async with server_connection(server, begin=True) as connection:
            await connection.fetch(
                insert(TASKS).values(
                    id=uuid.uuid4(),
                    owner=owner,
                    project_id=uuid.uuid4(),
                    created_by=owner,
                    title="rolled back",
                )
            )
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(cancelled_inside_a_transaction())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    seen: list[bool] = []

    def record(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        seen.append(in_transaction)

    with server.observing(record):
        async with server_connection(server) as connection:
            rows = await connection.fetch(
                select(TASKS.c.id).where(TASKS.c.owner == bindparam("owner")), {"owner": owner}
            )
    assert rows == []
    assert seen == [False]


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (asyncpg.exceptions.ConnectionDoesNotExistError("lost"), DatabaseUnavailableError),
        (asyncpg.exceptions.InterfaceError("connection is closed"), DatabaseUnavailableError),
        (
            asyncpg.exceptions.InternalClientError("another operation (2) is in progress"),
            DatabaseUnavailableError,
        ),
        (asyncpg.exceptions.AdminShutdownError("shutting down"), DatabaseUnavailableError),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), DatabaseUnavailableError),
        (asyncpg.exceptions.TooManyConnectionsError("too many"), DatabaseUnavailableError),
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), DatabaseUnavailableError),
        (ConnectionRefusedError(111, "refused"), DatabaseUnavailableError),
        (TimeoutError(), DatabaseUnavailableError),
        (asyncpg.exceptions.UniqueViolationError("duplicate"), None),
        (asyncpg.exceptions.UndefinedColumnError("no column"), None),
        (asyncpg.exceptions.SerializationError("conflict with recovery"), None),
        (ValueError("a bug"), None),
    ],
)
def test_asyncpg_failures_are_outages_only_when_the_database_cannot_serve(error, outage):
    assert unavailable(error) is outage


@pytest.mark.parametrize("query", ["", "?ssl=disable", "?prepared_statement_cache_size=0"])
async def test_a_url_means_what_it_means_to_sqlalchemy(make_settings: SettingsFactory, query):
    settings = make_settings().database
    assert settings.url is not None
    url = settings.url.get_secret_value()
    if query:  # the embedded server's URL has a query of its own (its socket's directory)
        url += ("&" if "?" in url else "?") + query[1:]
    server = await DatabaseServer.open(settings, url=url)
    try:
        async with server_connection(server) as connection:
            [row] = await connection.fetch(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
    finally:
        await server.aclose()
    if query == "?ssl=disable":
        assert row["ssl"] is False
