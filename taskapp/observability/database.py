"""Database metrics: latency of every statement at the driver level, errors by class, a
periodic `db_up` probe, and the connection pool's occupancy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg
from sqlalchemy import event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from taskapp.observability.metrics import (
    DB_ERRORS,
    DB_POOL_CHECKED_OUT,
    DB_POOL_OVERFLOW,
    DB_POOL_SIZE,
    DB_QUERY_LATENCY,
    Labelled,
    db_up,
)

logger = logging.getLogger(__name__)

_OPERATIONS = frozenset({"select", "insert", "update", "delete"})
PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 2.0


def operation(statement: str) -> str:
    """The kind of a statement: select, insert, update, delete or other (bounded labels)."""
    word = statement.lstrip().split(None, 1)[0].lower() if statement.strip() else ""
    return word if word in _OPERATIONS else "other"


# The statement latency by kind of operation, for every driver that runs statements.
QUERY_LATENCY = Labelled(DB_QUERY_LATENCY)
_SELECT_1 = text("SELECT 1")


def instrument(engine: AsyncEngine) -> None:
    """Time every statement the engine runs and count its errors."""
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _started(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if context is not None:
            context._taskapp_started = time.perf_counter()

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _finished(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        started = getattr(context, "_taskapp_started", None)
        if started is not None:
            QUERY_LATENCY(operation(statement)).observe(time.perf_counter() - started)

    @event.listens_for(sync_engine, "handle_error")
    def _failed(context: ExceptionContext) -> None:
        DB_ERRORS.labels(type(context.original_exception).__name__).inc()


def record_pool(pool: asyncpg.Pool) -> None:
    """The requests' pool of this process: its capacity and the connections in use."""
    DB_POOL_SIZE.set(pool.get_max_size())
    DB_POOL_CHECKED_OUT.set(pool.get_size() - pool.get_idle_size())
    DB_POOL_OVERFLOW.set(0)


async def probe(engine: AsyncEngine, pool: asyncpg.Pool) -> bool:
    """Ask the database for `SELECT 1` on the engine's connection, apart from the requests'
    `pool` (a busy pool neither delays the probe nor is taken from by it); keeps `db_up` and
    the pool's gauges current."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT), engine.connect() as connection:
            await connection.execute(_SELECT_1)
    except Exception as exc:
        if isinstance(exc, TimeoutError | OSError):  # not seen by handle_error
            DB_ERRORS.labels(type(exc).__name__).inc()
        db_up().set(0)
        logger.debug("database probe failed: %r", exc)
        up = False
    else:
        db_up().set(1)
        up = True
    record_pool(pool)
    return up


async def probe_forever(
    engine: AsyncEngine, pool: asyncpg.Pool, interval: float = PROBE_INTERVAL
) -> None:
    while True:
        await probe(engine, pool)
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def probing(engine: AsyncEngine, pool: asyncpg.Pool, interval: float = PROBE_INTERVAL) -> Any:
    """Run the periodic probe for the duration of the block (the app's lifetime)."""
    task = asyncio.create_task(probe_forever(engine, pool, interval))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
