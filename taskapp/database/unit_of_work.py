"""The unit of work: one change, whose statements and events commit together, and whose
effects (cache invalidation, the hand-off of its events) follow the commit, never precede it.

    async with database.unit_of_work() as work:
        work.emit(event)
        rows = await work.fetch(statement, parameters)
        work.touches(*views)

By default the statements run in one transaction (BEGIN ... COMMIT). A change that is one
statement can say so (`single_statement=True`): it then runs alone on an autocommit
connection, and its events are inserted by that same statement (as CTEs), which is as
atomic as a transaction and saves the BEGIN and COMMIT round trips; a second statement is a
programming error there, and so is an event emitted after the statement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from asyncpg.transaction import Transaction
from sqlalchemy import Insert
from sqlalchemy.sql import Executable
from sqlalchemy.sql.dml import UpdateBase

from taskapp.database.driver import Connection, Record
from taskapp.database.outages import (
    OutcomeUnknownError,
    outages_as_unavailable,
    unknown_outcomes,
)
from taskapp.database.servers import DatabaseServer, Gate, server_connection

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)

# A row written with a change: its INSERT and the values bound to it. The names of the bound
# parameters are the journal's own, apart from those of the statements it joins.
Rider = tuple[Insert, Mapping[str, Any]]


class Entry(Protocol):
    """A journal's record of a unit of work's events."""

    @property
    def rows(self) -> Sequence[Rider]:
        """The inserts that store the events; none when nothing consumes them."""
        ...

    def committed(self) -> None:
        """The rows are committed: hand the events on (never blocks, never fails)."""
        ...


class Journal(Protocol[E_contra]):
    """Where the events of a unit of work go (taskapp.events.outbox.Outbox)."""

    def record(self, events: Sequence[E_contra]) -> Entry: ...


class Invalidator(Protocol):
    """What forgets cached views (taskapp.redis.cache.ResponseCache)."""

    async def invalidate(self, *views: str) -> None: ...

    async def invalidate_all(self) -> None: ...


class Executor(Protocol):
    """What repositories run their statements on: a connection, or a unit of work."""

    async def fetch(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None, /
    ) -> list[Record]: ...


class UnitOfWork(Generic[E]):
    """One change on the primary (see the module). Not reusable; not shared between tasks."""

    def __init__(
        self,
        server: DatabaseServer,
        *,
        gate: Gate | None = None,
        journal: Journal[E] | None = None,
        invalidator: Invalidator | None = None,
        single_statement: bool = False,
    ) -> None:
        self._server = server
        self._gate = gate
        self._journal = journal
        self._invalidator = invalidator
        self._single = single_statement
        # One transaction around the statements: always, but for a single statement on a
        # server that commits each statement as it returns.
        self._begin = server.transactional or not single_statement
        self._events: list[E] = []
        self._entry: Entry | None = None
        self._views: list[str] = []
        self._possible: list[str] = []
        self._resources = contextlib.AsyncExitStack()
        self._connection: Connection | None = None
        self._transaction: Transaction | None = None
        self._committed = False

    async def __aenter__(self) -> Self:
        return self

    def emit(self, event: E) -> None:
        """Record `event` with this change: it commits with it or not at all."""
        if self._single and self._committed:
            raise RuntimeError("a single-statement unit of work takes its events before it")
        self._events.append(event)

    def touches(self, *views: str) -> None:
        """The cached views this change makes stale: forgotten after the commit (and when its
        outcome is unknown)."""
        self._views.extend(views)

    def may_touch(self, *views: str) -> None:
        """The cached views this change would make stale, said before its statement tells
        whether it changes anything: forgotten only when its outcome is unknown. A change
        whose outcome is unknown before it named any view (an admin's, whose owner its
        statement returns) forgets every view."""
        self._possible.extend(views)

    async def fetch(
        self, statement: Executable, parameters: Mapping[str, Any] | None = None, /
    ) -> list[Record]:
        """Run `statement` as part of this change; the rows it returns."""
        if not self._single:
            connection = await self._connect()
            with outages_as_unavailable():
                return await connection.fetch(statement, parameters)
        if self._committed:
            raise RuntimeError("a single-statement unit of work ran a second statement")
        riders = self._riders()
        if riders and not isinstance(statement, UpdateBase):
            raise TypeError("events ride only on an INSERT, UPDATE or DELETE")
        return await self._run_alone(statement, parameters, riders)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                await self._commit()
            else:
                await self._release(commit=False)
        except OutcomeUnknownError:
            await self._forget_views(unknown=True)
            raise
        if self._committed:
            await self._forget_views(unknown=False)
            if self._entry is not None:
                self._entry.committed()
        elif isinstance(exc, OutcomeUnknownError):
            await self._forget_views(unknown=True)

    # -- internals ---------------------------------------------------------------------------

    def _riders(self) -> Sequence[Rider]:
        """The rows of the events, recorded once they are all known."""
        if not self._events or self._journal is None:
            return ()
        self._entry = self._journal.record(self._events)
        return self._entry.rows

    async def _connect(self) -> Connection:
        if self._connection is None:
            connection = await self._resources.enter_async_context(
                server_connection(self._server, self._gate, begin=False)
            )
            if self._begin:
                self._transaction = connection.raw.transaction()
                with outages_as_unavailable():
                    await self._transaction.start()
            self._connection = connection
        return self._connection

    async def _run_alone(
        self, statement: Executable, parameters: Mapping[str, Any] | None, riders: Sequence[Rider]
    ) -> list[Record]:
        """The single statement, with `riders` inside it; committed as it returns."""
        if riders:
            assert isinstance(statement, UpdateBase)
            statement = _with_riders(statement, tuple(insert for insert, _ in riders))
            parameters = {**(parameters or {}), **_values(riders)}
        connection = await self._connect()
        with unknown_outcomes():
            result = await connection.fetch(statement, parameters)
            await self._release(commit=True)
        self._committed = True
        return result

    async def _commit(self) -> None:
        if self._single:
            riders = () if self._committed else self._riders()
            if riders:  # events and no statement: they are the change
                (first, values), *rest = riders
                await self._run_alone(first, values, rest)
            return
        riders = self._riders()
        if self._connection is None and not riders:
            return  # nothing was done
        connection = await self._connect()
        with outages_as_unavailable():
            for insert, values in riders:
                await connection.fetch(insert, values)
        with unknown_outcomes():
            await self._release(commit=True)
        self._committed = True

    async def _release(self, *, commit: bool) -> None:
        """Commit (or roll back) and give the connection back."""
        transaction, self._transaction = self._transaction, None
        self._connection = None
        try:
            if transaction is not None and commit:
                await transaction.commit()
            elif transaction is not None:
                # On the way out of a failure: a connection that broke has nothing to roll
                # back, and the failure is what the caller must hear of.
                with contextlib.suppress(Exception):
                    await transaction.rollback()
        finally:
            await self._resources.aclose()

    async def _forget_views(self, *, unknown: bool) -> None:
        if self._invalidator is None:
            return
        views = [*self._views, *self._possible] if unknown else self._views
        if views:
            await self._invalidator.invalidate(*dict.fromkeys(views))
        elif unknown:
            await self._invalidator.invalidate_all()


def _values(riders: Sequence[Rider]) -> dict[str, Any]:
    return {name: value for _, values in riders for name, value in values.items()}


@lru_cache(maxsize=128)
def _with_riders(statement: UpdateBase, riders: tuple[Insert, ...]) -> UpdateBase:
    """`statement` with `riders` run inside it, as CTEs: one statement, one commit. Built once
    per combination, since statements and riders are themselves built once: a construct made
    per request would be compiled and cache-keyed per request."""
    for number, rider in enumerate(riders):
        statement = statement.add_cte(rider.cte(f"rider_{number}"))
    return statement
