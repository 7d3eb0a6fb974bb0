"""Database engine, sessions and the one place where a request's transaction commits."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Annotated, Any

import sqlalchemy.exc as sa_exc
from fastapi import Depends, Request
from sqlalchemy import MetaData, event
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from taskapp.config import DatabaseSettings

# Deterministic constraint names keep migrations and `alembic check` stable.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DatabaseUnavailableError(Exception):
    """The database cannot serve the request now (down, unreachable or pool exhausted)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def create_engine(
    settings: DatabaseSettings, *, generic_plans: bool = False, **overrides: Any
) -> AsyncEngine:
    """An asyncpg engine with a bounded pool and client/server timeouts.

    `generic_plans`: prepared statements are planned once per connection, not on every
    execution (`plan_cache_mode = force_generic_plan`). PostgreSQL otherwise keeps planning
    each execution of a statement on the partitioned `tasks` table afresh, because a generic
    plan's estimate counts all partitions, though run-time pruning executes one: a list page
    then costs twice the server time (measured: ~500 µs against ~240 µs). Only for
    statements whose generic plan is known to be good: the API's (see the tasks repository).
    """
    if settings.url is None:
        raise ValueError("TASKAPP_DATABASE_URL is not set")
    server_settings = {"application_name": "taskapp"}
    if generic_plans:
        server_settings["plan_cache_mode"] = "force_generic_plan"
    if settings.statement_timeout:
        server_settings["statement_timeout"] = str(int(settings.statement_timeout * 1000))
    options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        "echo": settings.echo,
        "connect_args": {
            "timeout": settings.connect_timeout,
            "command_timeout": settings.command_timeout,
            "server_settings": server_settings,
        },
    }
    options.update(overrides)
    engine = create_async_engine(settings.url.get_secret_value(), **options)
    if not options.get("pool_pre_ping"):
        event.listen(engine.sync_engine, "checkout", _discard_closed)
    return engine


def _discard_closed(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Hand out no pooled connection the server has closed (restart, failover, idle kill).

    In place of `pool_pre_ping`, whose asyncpg ping is three round trips per checkout
    (BEGIN, a query, ROLLBACK); this is a local check of the socket. The pool replaces a
    connection refused here with a new one. A connection that dies without the server
    closing it fails its first query instead, which invalidates the pool as a ping would.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise sa_exc.DisconnectionError("connection closed by the server")


# Request state: an awaitable a request must pass before its first statement (the rate limit
# of a read, which is counted as late as that; see taskapp.ratelimit).
BEFORE_DATABASE_WORK = "before_database_work"


def _admitted(method: Callable[..., Awaitable[Any]]) -> Any:
    @functools.wraps(method)
    async def admitted(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
        gate = self.info.pop(BEFORE_DATABASE_WORK, None)
        if gate is not None:
            await gate()
        return await method(self, *args, **kwargs)

    return admitted


class RequestSession(AsyncSession):
    """A request's session: whatever the request must pass before touching the database
    (`BEFORE_DATABASE_WORK`) runs before the first statement, whichever method sends it."""

    execute = _admitted(AsyncSession.execute)
    scalar = _admitted(AsyncSession.scalar)
    get = _admitted(AsyncSession.get)
    get_one = _admitted(AsyncSession.get_one)
    stream = _admitted(AsyncSession.stream)
    connection = _admitted(AsyncSession.connection)
    flush = _admitted(AsyncSession.flush)
    refresh = _admitted(AsyncSession.refresh)
    merge = _admitted(AsyncSession.merge)
    run_sync = _admitted(AsyncSession.run_sync)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: responses are serialized from objects after the commit.
    return async_sessionmaker(
        engine, class_=RequestSession, expire_on_commit=False, autoflush=False
    )


def read_only(engine: AsyncEngine) -> AsyncEngine:
    """The engine for reads: autocommit, so no BEGIN/COMMIT round trips.

    Nothing is lost: under READ COMMITTED every statement takes its own snapshot, inside a
    transaction or not.
    """
    return engine.execution_options(isolation_level="AUTOCOMMIT")


BUSY = "Database is busy: no connection became free in time"


def unavailable_reason(exc: BaseException) -> str | None:
    """Why `exc` means the database is unavailable, or None when it is a real bug."""
    if isinstance(exc, sa_exc.TimeoutError):
        return BUSY
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            return "Database unavailable"
        if type(exc.orig).__name__ in {"QueryCanceledError", "AdminShutdownError"}:
            return "Database unavailable"
        return None
    # asyncpg raises plain OS errors (refused, reset, timed out) when it cannot connect.
    if isinstance(exc, OSError):
        return "Database unavailable"
    return None


@contextmanager
def _outages_as_unavailable() -> Iterator[None]:
    """Database outages inside the block raise `DatabaseUnavailableError` (a 503)."""
    try:
        yield
    except Exception as exc:
        reason = unavailable_reason(exc)
        if reason is not None:
            raise DatabaseUnavailableError(reason) from exc
        raise


AfterCommit = Callable[[], Awaitable[None]]


def after_commit(session: AsyncSession, callback: AfterCommit) -> None:
    """Run `callback` once this request's transaction has committed (never if it fails),
    before the response is sent; e.g. cache invalidation."""
    session.info.setdefault("after_commit", []).append(callback)


class ConnectionGate:
    """First come, first served access to the connection pool, for the requests of a process.

    SQLAlchemy's pool hands a returned connection to whichever task asks next, not to the
    one that has waited longest (sqlalchemy/sqlalchemy#7679; asyncio.Queue is not fair
    either): under load a few requests starve until `pool_timeout` and fail while later
    ones pass. Measured with 128 tasks sharing 10 slots: the queue's longest wait 3 s, a
    FIFO semaphore's 27 ms. This semaphore of the pool's capacity stands in front of it, so
    waiting happens here, in order, and the pool itself has a connection for everyone who
    passes.
    """

    def __init__(self, capacity: int, timeout: float) -> None:
        self._slots = asyncio.Semaphore(capacity)
        self._timeout = timeout

    async def acquire(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseUnavailableError(BUSY) from None

    def release(self) -> None:
        self._slots.release()


@asynccontextmanager
async def request_session(
    request: Request, factory: async_sessionmaker[AsyncSession]
) -> AsyncIterator[AsyncSession]:
    """A session for `request`: before its first statement the request passes its gate and
    waits its turn for a connection; it commits once when the block ends, and database
    outages surface as `DatabaseUnavailableError`."""
    rate_gate = getattr(request.state, BEFORE_DATABASE_WORK, None)
    connections: ConnectionGate = request.app.state.connection_gate
    holding = False

    async def before_first_statement() -> None:
        nonlocal holding
        if rate_gate is not None:
            await rate_gate()
        await connections.acquire()
        holding = True

    try:
        async with factory() as session:
            session.info[BEFORE_DATABASE_WORK] = before_first_statement
            # Leaving the block closes the session; an uncommitted transaction rolls back.
            with _outages_as_unavailable():
                yield session
                await session.commit()
            for callback in session.info.pop("after_commit", []):
                await callback()
    finally:
        if holding:
            connections.release()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; commits once, after the handler, before the response."""
    async with request_session(request, request.app.state.session_factory) as session:
        yield session


# scope="function": the commit runs before the response is sent, so a failed commit
# becomes an error response instead of a 2xx for data that was never stored.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


@asynccontextmanager
async def read_connection(request: Request) -> AsyncIterator[AsyncConnection]:
    """An autocommit connection for `request`'s reads, once it has passed its gate and had
    its turn; database outages surface as `DatabaseUnavailableError`. A plain connection: a
    session's unit of work and transaction bookkeeping cost a read about 120 µs for nothing."""
    gate = getattr(request.state, BEFORE_DATABASE_WORK, None)
    if gate is not None:
        await gate()
    connections: ConnectionGate = request.app.state.connection_gate
    await connections.acquire()
    try:
        with _outages_as_unavailable():
            async with request.app.state.read_engine.connect() as connection:
                yield connection
    finally:
        connections.release()


class ReadConnections:
    """Opens read connections for one request, when it needs one: a read answered from the
    cache then costs none, and no generator dependency around the handler."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def __call__(self) -> AbstractAsyncContextManager[AsyncConnection]:
        return read_connection(self._request)


async def get_read_connections(request: Request) -> ReadConnections:
    return ReadConnections(request)


ReadConnectionsDep = Annotated[ReadConnections, Depends(get_read_connections)]


def alembic_config(database_url: str | None = None) -> Any:
    """The project's Alembic configuration, optionally pointed at `database_url`."""
    from pathlib import Path

    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "migrations"))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def upgrade_database(database_url: str | None = None) -> None:
    """`alembic upgrade head` against `database_url` (default: the configured one)."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")
