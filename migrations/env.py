"""Alembic environment: async engine from taskapp's settings, models as the target."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from taskapp.config import DatabaseSettings
from taskapp.database.base import Base
from taskapp.events import models as event_models  # noqa: F401 - registers the tables
from taskapp.membership import models as membership_models  # noqa: F401
from taskapp.tasks import models as task_models
from taskapp.users import models as user_models  # noqa: F401

config = context.config
target_metadata = Base.metadata

# Partitions are created by the migration, not mapped: autogenerate must not drop them.
_PARTITION = re.compile("^" + task_models.PARTITION_NAME.format(r"\d+") + "$")


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    return not (type_ == "table" and name is not None and _PARTITION.match(name))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _database() -> DatabaseSettings:
    given = config.attributes.get("database_url")
    return DatabaseSettings(url=given) if given else DatabaseSettings()


def _database_url() -> str:
    url = _database().url
    if url is None:
        raise SystemExit("TASKAPP_DATABASE_URL is not set")
    return url.get_secret_value()


async def _run_async() -> None:
    # Behind PgBouncer (transaction mode) no named statements: see taskapp.database.engine.
    unnamed = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    engine = create_async_engine(
        _database_url(),
        poolclass=NullPool,
        connect_args=unnamed if _database().pgbouncer else {},
    )
    async with engine.connect() as connection:
        await connection.run_sync(_configure)
    await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
