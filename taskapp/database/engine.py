"""SQLAlchemy's engines, for everything off the request path (which runs on asyncpg directly,
`taskapp.database.driver`): the asyncpg engine of maintenance and the replica's measurements,
and the psycopg engine of the Celery jobs."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy.exc as sa_exc
from pydantic import SecretStr
from sqlalchemy import Engine, event, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from taskapp.config import DatabaseSettings
from taskapp.database.driver import server_settings

logger = logging.getLogger(__name__)


def create_engine(
    settings: DatabaseSettings,
    *,
    url: SecretStr | None = None,
    **overrides: Any,
) -> AsyncEngine:
    """An asyncpg engine with a bounded pool and client/server timeouts.

    `url`: another server of the same database (the read replica); default `settings.url`.
    """
    url = url or settings.url
    if url is None:
        raise ValueError("TASKAPP_DATABASE_URL is not set")
    connect_args: dict[str, Any] = {}
    if settings.pgbouncer:
        # Named statements would outlive the transaction on a server connection other
        # clients share; unnamed ones are replaced by the next.
        connect_args |= {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    options: dict[str, Any] = {
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_timeout": settings.pool_timeout,
        "pool_recycle": settings.pool_recycle,
        "echo": settings.echo,
        "connect_args": {
            "timeout": settings.connect_timeout,
            "command_timeout": settings.command_timeout,
            "server_settings": server_settings(settings, generic_plans=False),
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
