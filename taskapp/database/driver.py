"""Requests' statements on asyncpg directly.

SQLAlchemy builds the statements (Core constructs, each built once); this module compiles
each once into asyncpg's SQL and runs it on a connection of an asyncpg pool. Between the two,
SQLAlchemy's execution layer (pool checkout, execution context, result objects) cost a read by
id about as much CPU again as asyncpg's own work (docs/performance.md). Its engine stays for
everything off the request path: migrations, the Celery jobs, the replica's measurements.

Rows come back as asyncpg returns them (`asyncpg.Record`: by column name or position), with
no result processing: statements on this path return plain columns, never JSON.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg import Record as Record
from sqlalchemy import Integer, make_url
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.sql import Executable

from taskapp.config import DatabaseSettings
from taskapp.observability.database import QUERY_LATENCY, operation
from taskapp.observability.metrics import DB_ERRORS

_DIALECT = asyncpg_dialect()  # type: ignore[no-untyped-call]
_PLACEHOLDER = re.compile(r"\$(\d+)")
_LITERAL = re.compile(r"__\[POSTCOMPILE_(\w+)\]")
_REQUIRED = object()
logger = logging.getLogger(__name__)

# Sees each statement run on a server: its SQL, its arguments, and whether the connection is
# inside a transaction after it (tests and the benchmark's plans; production registers none).
Observer = Callable[[str, Sequence[Any], bool], None]


@dataclass(frozen=True, slots=True)
class Compiled:
    """A statement as asyncpg runs it."""

    sql: str
    names: tuple[str, ...]  # the bound parameters, in $1, $2, ... order
    values: tuple[Any, ...]  # their values given in the statement itself, or _REQUIRED
    processors: tuple[Callable[[Any], Any] | None, ...]  # their types' bind processing
    literals: frozenset[str]  # integers written into the SQL (`literal_execute`)
    operation: str  # select, insert, update, delete or other: the metrics' label

    def arguments(self, parameters: Mapping[str, Any]) -> list[Any]:
        arguments = []
        for name, value, process in zip(self.names, self.values, self.processors, strict=True):
            if name in parameters:
                value = parameters[name]
            elif value is _REQUIRED:
                raise KeyError(f"no value for the bound parameter {name!r}")
            arguments.append(value if process is None else process(value))
        return arguments

    def text(self, parameters: Mapping[str, Any]) -> str:
        if not self.literals:
            return self.sql

        def literal(match: re.Match[str]) -> str:
            value = parameters[match[1]]
            if type(value) is not int:
                raise TypeError(f"{match[1]}: a literal bound here must be an int")
            return str(value)

        return _LITERAL.sub(literal, self.sql)


# By the statement object: the API's statements are built once and live as long as the
# process; ad hoc ones (scripts, tests) are few. Keeps the statement, so its id stays its own.
_COMPILED: dict[int, tuple[Executable, Compiled]] = {}
_COMPILED_LIMIT = 2048


def compiled(statement: Executable) -> Compiled:
    """`statement` compiled for asyncpg, once per statement object."""
    found = _COMPILED.get(id(statement))
    if found is not None and found[0] is statement:
        return found[1]
    result = _compile(statement)
    if len(_COMPILED) >= _COMPILED_LIMIT:
        _COMPILED.clear()
    _COMPILED[id(statement)] = (statement, result)
    return result


def compilations() -> int:
    """How many statements have been compiled and are held (for tests)."""
    return len(_COMPILED)


def _compile(statement: Executable) -> Compiled:
    compiled_ = statement.compile(dialect=_DIALECT)  # type: ignore[attr-defined]
    if compiled_.insert_prefetch or compiled_.update_prefetch:
        # Defaults computed in Python are SQLAlchemy's execution layer's job: bind them.
        raise TypeError("a statement run here binds every value it writes")
    literals = frozenset(bind.key for bind in compiled_.literal_execute_params)
    for bind in compiled_.literal_execute_params:
        if not isinstance(bind.type, Integer):
            raise TypeError(f"{bind.key}: only integers are written into the SQL")
    names = tuple(name for name in compiled_.positiontup or () if name not in literals)
    sql = compiled_.string
    numbers = {int(number) for number in _PLACEHOLDER.findall(_LITERAL.sub("", sql))}
    if numbers != set(range(1, len(names) + 1)):
        raise TypeError(f"unexpected placeholders in {sql!r}")
    binds = [compiled_.binds[name] for name in names]
    if any(bind.callable is not None for bind in binds):
        raise TypeError("a value computed per execution (bindparam callable_) is not supported")
    values = tuple(_REQUIRED if bind.required else bind.effective_value for bind in binds)
    processors = tuple(bind.type._cached_bind_processor(_DIALECT) for bind in binds)
    return Compiled(sql, names, values, processors, literals, operation(sql))


class Connection:
    """A pooled asyncpg connection, running SQLAlchemy statements; every statement timed and
    its failures counted in the database metrics."""

    __slots__ = ("_observers", "raw")

    def __init__(self, raw: asyncpg.Connection, observers: Sequence[Observer] = ()) -> None:
        self.raw = raw
        self._observers = observers

    async def fetch(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None, /
    ) -> list[Record]:
        """Every row `statement` returns (none for a statement without RETURNING)."""
        plan = compiled(statement)
        parameters = parameters or {}
        sql = plan.text(parameters)
        arguments = plan.arguments(parameters)
        started = time.perf_counter()
        try:
            rows: list[Record] = await self.raw.fetch(sql, *arguments)
        except Exception as exc:
            DB_ERRORS.labels(type(exc).__name__).inc()
            if isinstance(exc, asyncpg.InternalClientError):
                # The connection's protocol is mid-exchange (a server that went away while a
                # statement was prepared): no later statement can run on it.
                self.raw.terminate()
            raise
        QUERY_LATENCY(plan.operation).observe(time.perf_counter() - started)
        for observer in self._observers:
            observer(sql, arguments, self.raw.is_in_transaction())
        return rows

    async def fetchrow(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None, /
    ) -> Record | None:
        """The first row `statement` returns, or None."""
        rows = await self.fetch(statement, parameters)
        return rows[0] if rows else None


def connect_arguments(url: str) -> dict[str, Any]:
    """`asyncpg.connect`'s arguments for a database URL, read as SQLAlchemy's asyncpg dialect
    reads it, so that a URL means the same to both (`?ssl=require`, `?host=/run/postgresql`)."""
    _, arguments = _DIALECT.create_connect_args(make_url(url))  # type: ignore[no-untyped-call]
    arguments.pop("prepared_statement_cache_size", None)  # SQLAlchemy's own
    return dict(arguments)


async def _reset(connection: asyncpg.Connection) -> None:
    """A connection back from a request: roll back a transaction left open (a cancelled
    request's); nothing else, since requests change no session state. asyncpg's default
    sends a reset query to the server at every release."""
    if connection.is_in_transaction():
        await connection.execute("ROLLBACK")


def server_settings(settings: DatabaseSettings, *, generic_plans: bool) -> dict[str, str]:
    """The session settings sent at connect: `generic_plans` (see
    `taskapp.database.engine.create_engine`) and the statement timeout. None behind PgBouncer,
    which refuses startup parameters it does not track (and a generic plan nobody reuses is
    no gain)."""
    values = {"application_name": "taskapp"}
    if not settings.pgbouncer:
        if generic_plans:
            values["plan_cache_mode"] = "force_generic_plan"
        if settings.statement_timeout:
            values["statement_timeout"] = str(int(settings.statement_timeout * 1000))
    return values


async def create_pool(
    settings: DatabaseSettings, *, url: str | None = None, generic_plans: bool = False
) -> asyncpg.Pool:
    """The requests' pool for one server: at most `pool_size + max_overflow` connections,
    opened when first needed (the server may be down at start-up), idle ones closed after
    `pool_recycle` seconds. Behind PgBouncer statements are prepared unnamed (nothing
    outlives the transaction on a server connection others share).

    `generic_plans`: prepared statements are planned once per connection, not on every
    execution (`plan_cache_mode = force_generic_plan`). PostgreSQL otherwise keeps planning
    each execution of a statement on the partitioned `tasks` table afresh, because a generic
    plan's estimate counts all partitions, though run-time pruning executes one: a list page
    then costs about twice the server time. Only for statements whose generic plan is known
    to be good: the API's (see the tasks repository)."""
    if url is None:
        if settings.url is None:
            raise ValueError("TASKAPP_DATABASE_URL is not set")
        url = settings.url.get_secret_value()
    options: dict[str, Any] = {}
    if settings.pgbouncer:
        options["statement_cache_size"] = 0
    pool: asyncpg.Pool = await asyncpg.create_pool(
        **connect_arguments(url),
        min_size=0,
        max_size=settings.pool_size + settings.max_overflow,
        max_inactive_connection_lifetime=max(settings.pool_recycle, 0),
        timeout=settings.connect_timeout,
        command_timeout=settings.command_timeout,
        server_settings=server_settings(settings, generic_plans=generic_plans),
        reset=_reset,
        **options,
    )
    return pool


def log_statement(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
    """An observer that logs every statement with its arguments (`TASKAPP_DATABASE_ECHO`,
    for development only: the arguments are the data)."""
    logger.info("%s %r", statement, tuple(arguments))


@contextmanager
def observing(observers: list[Observer], observer: Observer) -> Iterator[None]:
    """`observer` sees every statement run while the block runs."""
    observers.append(observer)
    try:
        yield
    finally:
        observers.remove(observer)
