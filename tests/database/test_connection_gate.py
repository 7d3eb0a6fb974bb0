"""Requests wait for a database connection in arrival order, and give up with a clear 503."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text

from taskapp.app import create_app
from taskapp.database.outages import DatabaseBusyError
from taskapp.database.servers import ConnectionGate
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, app_state, running
from tests.fixtures.tasks import task_queries


async def test_waiters_are_served_in_arrival_order_and_newcomers_queue_behind():
    gate = ConnectionGate(1, timeout=2)
    await gate.acquire()
    served: list[str] = []

    async def use(name: str) -> None:
        await gate.acquire()
        served.append(name)
        await asyncio.sleep(0.01)
        gate.release()

    waiting = [asyncio.create_task(use(f"waiter {n}")) for n in range(3)]
    await asyncio.sleep(0.01)  # all three are queued
    gate.release()
    newcomer = asyncio.create_task(use("newcomer"))  # arrives as a slot frees up
    await asyncio.gather(*waiting, newcomer)
    assert served == ["waiter 0", "waiter 1", "waiter 2", "newcomer"]


async def test_a_wait_past_the_pool_timeout_is_a_busy_error():
    gate = ConnectionGate(1, timeout=0.1)
    await gate.acquire()
    with pytest.raises(DatabaseBusyError) as raised:
        await gate.acquire()
    assert raised.value.detail == "Database is busy: no connection became free in time"
    gate.release()
    await gate.acquire()  # the timed-out waiter took no slot with it


async def test_reads_and_writes_that_wait_past_the_pool_timeout_answer_503(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    app = create_app(
        make_settings(database={"pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3})
    )
    alice = oidc.auth(f"gate-{uuid.uuid4()}")
    async with running(app) as client:
        gate: ConnectionGate = app_state(app).database.gate
        await gate.acquire()  # the only connection is taken
        with task_queries(app) as statements:
            read = await client.get(f"/tasks/{uuid.uuid4()}", headers=alice)
            write = await client.post("/tasks", json={"title": "x"}, headers=alice)
        for response in (read, write):
            assert response.status_code == 503
            assert response.json() == {
                "detail": "Database is busy: no connection became free in time",
                "code": "database_busy",
            }
        assert statements == []
        gate.release()
        # The slot back, the next request passes at once.
        assert (await client.post("/tasks", json={"title": "y"}, headers=alice)).status_code == 201
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))


async def test_concurrent_reads_and_writes_take_turns_on_one_connection(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    """30 requests at once, one connection: each waits its turn and none needs a second
    connection while it holds one (which would leave the others waiting until they fail).
    The timeout is long: how fast this machine serves the line is not what is tested."""
    app = create_app(
        make_settings(database={"pool_size": 1, "max_overflow": 0, "pool_timeout": 10})
    )
    alice = oidc.auth(f"gate-{uuid.uuid4()}")  # new: her first requests also register her
    async with running(app) as client:
        responses = await asyncio.gather(
            *(client.post("/tasks", json={"title": f"t{n}"}, headers=alice) for n in range(15)),
            *(client.get(f"/tasks/{uuid.uuid4()}", headers=alice) for _ in range(15)),
        )
        assert sorted(r.status_code for r in responses) == [201] * 15 + [404] * 15
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))
