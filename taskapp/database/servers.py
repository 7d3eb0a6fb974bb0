"""A database server as requests use it: its pool of connections and the fair gate to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from taskapp.config import DatabaseSettings
from taskapp.database.driver import Connection, Observer, create_pool, log_statement, observing
from taskapp.database.outages import DatabaseBusyError, outages_as_unavailable

# What a request must pass before its first statement (its rate limit, when that is counted
# as late as that); raises to refuse it.
Gate = Callable[[], Awaitable[None]]
# Seconds a closing pool waits for its connections to come back before it cuts them.
CLOSE_TIMEOUT = 10.0


class ConnectionGate:
    """First come, first served access to the connection pool, for the requests of a process.

    A pool hands a returned connection to whichever task asks next, not to the one that has
    waited longest (asyncpg's waits on an asyncio.Queue, which is not fair; nor is
    SQLAlchemy's, sqlalchemy/sqlalchemy#7679): under load a few requests starve until
    `pool_timeout` and fail while later ones pass. This semaphore of the pool's capacity
    stands in front of it, so waiting happens here, in order, and the pool itself has a
    connection for everyone who passes.
    """

    def __init__(self, capacity: int, timeout: float) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self._timeout = timeout

    async def acquire(self) -> None:
        if not self._slots.locked():
            # A slot is free and nobody waits: taken at once (no wait to time).
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseBusyError() from None

    def release(self) -> None:
        self._slots.release()


@dataclass(frozen=True, slots=True)
class DatabaseServer:
    """One server (the primary, or the read replica) as requests use it: its pool of asyncpg
    connections (see `taskapp.database.driver`), the gate in front of it, and whether a
    request's statements need a transaction around them.

    A statement outside a transaction commits as it returns, with no BEGIN and COMMIT round
    trips around it (see `taskapp.database.unit_of_work`). Behind PgBouncer in transaction
    mode every request's statements run in a transaction of their own instead: an unnamed
    statement is prepared, then bound and executed, in two exchanges, and only a transaction
    keeps both on the same server connection."""

    pool: asyncpg.Pool
    gate: ConnectionGate
    transactional: bool
    observers: list[Observer] = field(default_factory=list)

    @classmethod
    async def open(cls, settings: DatabaseSettings, *, url: str | None = None) -> DatabaseServer:
        """The server at `url` (default: the primary's), its pool not yet connected."""
        pool = await create_pool(settings, url=url, generic_plans=True)
        capacity = settings.pool_size + settings.max_overflow
        return cls(
            pool,
            ConnectionGate(capacity, settings.pool_timeout),
            transactional=settings.pgbouncer,
            observers=[log_statement] if settings.echo else [],
        )

    async def aclose(self) -> None:
        """Close the pool once its connections are back; cut them after `CLOSE_TIMEOUT`."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()

    def observing(self, observer: Observer) -> contextlib.AbstractContextManager[None]:
        """`observer` sees every statement run on this server while the block runs."""
        return observing(self.observers, observer)


@asynccontextmanager
async def server_connection(
    server: DatabaseServer, gate: Gate | None = None, *, begin: bool | None = None
) -> AsyncIterator[Connection]:
    """A connection to `server`, once `gate` (the request's own admission, if it has one left
    to pass) and then the server's pool have let it through; outages inside the block raise
    `DatabaseUnavailableError`. Each statement commits as it returns; inside one transaction
    when `begin`, which is the server's `transactional` unless the caller handles
    transactions itself."""
    if gate is not None:
        await gate()
    await server.gate.acquire()
    try:
        with outages_as_unavailable():
            async with server.pool.acquire() as raw:
                connection = Connection(raw, server.observers)
                if server.transactional if begin is None else begin:
                    async with raw.transaction():
                        yield connection
                else:
                    yield connection
    finally:
        server.gate.release()
