"""Database engine, the connections requests use, and how a request's change commits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import sqlalchemy.exc as sa_exc
from fastapi import Depends, Request
from pydantic import SecretStr
from sqlalchemy import Engine, MetaData, event, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from taskapp.config import DatabaseSettings

if TYPE_CHECKING:
    from taskapp.replica import ReadReplica

T = TypeVar("T")

logger = logging.getLogger(__name__)

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
    settings: DatabaseSettings,
    *,
    generic_plans: bool = False,
    url: SecretStr | None = None,
    **overrides: Any,
) -> AsyncEngine:
    """An asyncpg engine with a bounded pool and client/server timeouts.

    `generic_plans`: prepared statements are planned once per connection, not on every
    execution (`plan_cache_mode = force_generic_plan`). PostgreSQL otherwise keeps planning
    each execution of a statement on the partitioned `tasks` table afresh, because a generic
    plan's estimate counts all partitions, though run-time pruning executes one: a list page
    then costs twice the server time (measured: ~500 µs against ~240 µs). Only for
    statements whose generic plan is known to be good: the API's (see the tasks repository).

    `url`: another server of the same database (the read replica); default `settings.url`.
    """
    url = url or settings.url
    if url is None:
        raise ValueError("TASKAPP_DATABASE_URL is not set")
    server_settings = {"application_name": "taskapp"}
    connect_args: dict[str, Any] = {}
    if settings.pgbouncer:
        # Named statements would outlive the transaction on a server connection other
        # clients share; unnamed ones are replaced by the next. PgBouncer refuses startup
        # parameters it does not track, and a generic plan nobody reuses is no gain.
        connect_args |= {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    else:
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
            **connect_args,
        },
    }
    options.update(overrides)
    engine = create_async_engine(url.get_secret_value(), **options)
    if not options.get("pool_pre_ping"):
        event.listen(engine.sync_engine, "checkout", _discard_closed)
    return engine


def create_sync_engine(settings: DatabaseSettings, **overrides: Any) -> Engine:
    """A psycopg engine, for synchronous code (the Celery jobs)."""
    if settings.url is None:
        raise ValueError("TASKAPP_DATABASE_URL is not set")
    url = settings.url.get_secret_value().replace("+asyncpg", "+psycopg", 1)
    connect_args: dict[str, Any] = {"connect_timeout": int(settings.connect_timeout)}
    if settings.pgbouncer:
        # psycopg prepares a statement run five times on a connection, by a name counted per
        # connection: on a server connection PgBouncer shares, another client's clashes.
        connect_args["prepare_threshold"] = None
    options: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args}
    return sa_create_engine(url, **(options | overrides))


async def check_statement_timeout(engine: AsyncEngine, settings: DatabaseSettings) -> None:
    """Behind PgBouncer the statement timeout is not sent (see `create_engine`): say so at
    start-up when the server has none either, since only the role can set it then."""
    if not settings.pgbouncer or not settings.statement_timeout:
        return
    try:
        async with engine.connect() as connection:
            value = (await connection.execute(text("SHOW statement_timeout"))).scalar_one()
    except Exception as exc:  # the database down at start-up is reported elsewhere
        logger.debug("statement_timeout not checked: %r", exc)
        return
    if value in {"0", "0ms"}:
        logger.warning(
            "behind PgBouncer, TASKAPP_DATABASE_STATEMENT_TIMEOUT (%g s) is not applied and "
            "the server has no statement_timeout: set it on the role "
            "(ALTER ROLE ... SET statement_timeout = '%ds')",
            settings.statement_timeout,
            int(settings.statement_timeout),
        )


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


def request_engine(engine: AsyncEngine, settings: DatabaseSettings) -> AsyncEngine:
    """The engine requests use: autocommit (see `autocommit`), except behind PgBouncer in
    transaction mode, where each request's statements run in a transaction of their own
    (see `request_connection`): an unnamed statement is prepared, then bound and executed,
    in two exchanges, and only a transaction keeps both on the same server connection."""
    return engine if settings.pgbouncer else autocommit(engine)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The engine for requests: every statement is its own transaction, committed when it
    returns, with no BEGIN and COMMIT round trips around it.

    A request changes data with one statement (a task and its outbox row are inserted by one
    statement), which is as atomic alone as inside BEGIN ... COMMIT; a change that needs
    several statements wraps them in `async with connection.begin()`. Reads lose nothing
    either: under READ COMMITTED every statement takes its own snapshot, in a transaction
    or not. Measured against a session's transaction: PATCH 726 -> 966 req/s.
    """
    return engine.execution_options(isolation_level="AUTOCOMMIT")


BUSY = "Database is busy: no connection became free in time"
UNAVAILABLE = "Database unavailable"


def unavailable_reason(exc: BaseException) -> str | None:
    """Why `exc` means the database is unavailable, or None when it is a real bug."""
    if isinstance(exc, sa_exc.TimeoutError):
        return BUSY
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            return UNAVAILABLE
        if type(exc.orig).__name__ in {"QueryCanceledError", "AdminShutdownError"}:
            return UNAVAILABLE
        # The server's own word that it cannot serve now, whatever the driver's class for
        # it: 08 connection exception, 53 insufficient resources (too many connections),
        # 57 operator intervention ("the database system is shutting down" / "is starting
        # up" while a connection is made, 57P03, a plain DBAPIError to SQLAlchemy).
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in {"08", "53", "57"}:
            return UNAVAILABLE
        return None
    # asyncpg raises plain OS errors (refused, reset, timed out) when it cannot connect.
    if isinstance(exc, OSError):
        return UNAVAILABLE
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


@dataclass(frozen=True, slots=True)
class RequestDatabase:
    """One server as requests use it: its engine (see `request_engine`), the gate in front of
    its pool, and whether a request's statements need a transaction around them."""

    engine: AsyncEngine
    gate: ConnectionGate
    transactional: bool

    @classmethod
    def for_engine(cls, engine: AsyncEngine, settings: DatabaseSettings) -> RequestDatabase:
        capacity = settings.pool_size + settings.max_overflow
        return cls(
            request_engine(engine, settings),
            ConnectionGate(capacity, settings.pool_timeout),
            transactional=settings.pgbouncer,
        )


@asynccontextmanager
async def request_connection(
    request: Request, database: RequestDatabase | None = None
) -> AsyncIterator[AsyncConnection]:
    """A connection to `database` (default: the primary) for `request`, once it has passed
    its gate (`BEFORE_DATABASE_WORK`) and had its turn at the pool; database outages inside
    the block surface as `DatabaseUnavailableError`. Autocommit, or one transaction behind
    PgBouncer (see `request_engine`), and a plain connection: a session's unit of work and
    transaction bookkeeping cost a statement about 120 µs."""
    gate = getattr(request.state, BEFORE_DATABASE_WORK, None)
    if gate is not None:
        await gate()
    if database is None:
        database = request.app.state.database
    await database.gate.acquire()
    try:
        with _outages_as_unavailable():
            async with database.engine.connect() as connection:
                safe = request.method in SAFE_METHODS
                with nullcontext() if safe else _unknown_outcomes():
                    if database.transactional:
                        async with connection.begin():
                            yield connection
                    else:
                        yield connection
    finally:
        database.gate.release()


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RECOVERY_CONFLICTS = frozenset({"40001", "40P01"})
OUTCOME_UNKNOWN = "Database did not answer: the change may or may not have been made"


@contextmanager
def _unknown_outcomes() -> Iterator[None]:
    """A change whose statement was sent and then lost its answer (a client-side timeout, a
    dropped connection) may have committed: a server that was paused, not gone, runs it
    when it resumes. Its 503 says so, rather than that nothing happened. A statement the
    server itself cancelled (statement_timeout, SQLSTATE 57014) was rolled back."""
    try:
        yield
    except Exception as exc:
        cancelled = getattr(getattr(exc, "orig", None), "sqlstate", None) == "57014"
        if unavailable_reason(exc) == UNAVAILABLE and not cancelled:
            raise DatabaseUnavailableError(OUTCOME_UNKNOWN) from exc
        raise


class Connections:
    """Opens connections for one request, when it needs one, and gives each back as soon as
    its block ends: a read answered from the cache then costs none, and a write holds one
    only for its statement, not while its side effects (cache, notifications) go out."""

    __slots__ = ("_request",)

    def __init__(self, request: Request) -> None:
        self._request = request

    def __call__(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection to the primary: for changes, and reads that must see them."""
        return request_connection(self._request)

    async def read(self, written_at: float, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`query`'s result, from the read replica when it has replayed the last write to
        what is read (`written_at`, a time from `ResponseCache`), else from the primary.
        When the replica fails, the primary answers this same read."""
        replica: ReadReplica | None = self._request.app.state.replica
        if replica is not None and replica.serves(written_at):
            try:
                async with request_connection(self._request, replica.database) as connection:
                    result = await query(connection)
            except DatabaseUnavailableError as exc:
                if exc.detail != BUSY:  # busy is no fault: only this read moves
                    replica.failed(exc.detail)
            except sa_exc.DBAPIError as exc:
                # A hot standby cancels a query that conflicts with what it replays (40001,
                # 40P01): the standby is fine. Anything else (a rotated password, a schema
                # the standby has not replayed yet) keeps it out until a check succeeds.
                if getattr(exc.orig, "sqlstate", None) not in RECOVERY_CONFLICTS:
                    replica.failed(type(exc.orig).__name__)
            else:
                replica.served()
                return result
        async with request_connection(self._request) as connection:
            result = await query(connection)
        if replica is not None:
            replica.passed()
        return result


async def get_connections(request: Request) -> Connections:
    return Connections(request)


ConnectionsDep = Annotated[Connections, Depends(get_connections)]


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
