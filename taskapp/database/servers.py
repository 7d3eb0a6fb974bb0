"""A database server as requests use it: its request engine and the fair gate to its pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from taskapp.config import DatabaseSettings
from taskapp.database.engine import request_engine
from taskapp.database.outages import DatabaseBusyError, outages_as_unavailable

# What a request must pass before its first statement (its rate limit, when that is counted
# as late as that); raises to refuse it.
Gate = Callable[[], Awaitable[None]]


class ConnectionGate:
    """First come, first served access to the connection pool, for the requests of a process.

    SQLAlchemy's pool hands a returned connection to whichever task asks next, not to the
    one that has waited longest (sqlalchemy/sqlalchemy#7679; asyncio.Queue is not fair
    either): under load a few requests starve until `pool_timeout` and fail while later
    ones pass. This semaphore of the pool's capacity stands in front of it, so waiting
    happens here, in order, and the pool itself has a connection for everyone who passes.
    """

    def __init__(self, capacity: int, timeout: float) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self._timeout = timeout

    async def acquire(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseBusyError() from None

    def release(self) -> None:
        self._slots.release()


@dataclass(frozen=True, slots=True)
class DatabaseServer:
    """One server (the primary, or the read replica) as requests use it: its engine (see
    `request_engine`), the gate in front of its pool, and whether a request's statements
    need a transaction around them (PgBouncer in transaction mode)."""

    engine: AsyncEngine
    gate: ConnectionGate
    transactional: bool

    @classmethod
    def for_engine(cls, engine: AsyncEngine, settings: DatabaseSettings) -> DatabaseServer:
        capacity = settings.pool_size + settings.max_overflow
        return cls(
            request_engine(engine, settings),
            ConnectionGate(capacity, settings.pool_timeout),
            transactional=settings.pgbouncer,
        )


@asynccontextmanager
async def server_connection(
    server: DatabaseServer, gate: Gate | None = None, *, begin: bool | None = None
) -> AsyncIterator[AsyncConnection]:
    """A connection to `server`, once `gate` (the request's own admission, if it has one left
    to pass) and then the server's pool have let it through; outages inside the block raise
    `DatabaseUnavailableError`. Autocommit; inside one transaction when `begin`, which is
    the server's `transactional` unless the caller handles transactions itself."""
    if gate is not None:
        await gate()
    await server.gate.acquire()
    try:
        with outages_as_unavailable():
            async with server.engine.connect() as connection:
                if server.transactional if begin is None else begin:
                    async with connection.begin():
                        yield connection
                else:
                    yield connection
    finally:
        server.gate.release()
