"""The database as one request uses it: reads routed to the replica or the primary, and
units of work for changes. Connections are taken when a statement needs one and given back
as soon as its block ends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from taskapp.database.driver import Connection
from taskapp.database.outages import (
    RECOVERY_CONFLICTS,
    DatabaseBusyError,
    DatabaseUnavailableError,
)
from taskapp.database.replica import ReadReplica
from taskapp.database.servers import DatabaseServer, Gate, server_connection
from taskapp.database.unit_of_work import Invalidator, Journal, UnitOfWork

T = TypeVar("T")


class Database:
    """The primary and the read replica for one request.

    `gate`: awaited before the request's first statement (its rate limit, when that is
    counted as late as that). `journal` takes the events of its units of work, and
    `invalidator` forgets the cached views they touch.
    """

    __slots__ = ("_gate", "_invalidator", "_journal", "primary", "replica")

    def __init__(
        self,
        primary: DatabaseServer,
        replica: ReadReplica | None = None,
        *,
        gate: Gate | None = None,
        journal: Journal[Any] | None = None,
        invalidator: Invalidator | None = None,
    ) -> None:
        self.primary = primary
        self.replica = replica
        self._gate = gate
        self._journal = journal
        self._invalidator = invalidator

    def unit_of_work(self, *, single_statement: bool = False) -> UnitOfWork[Any]:
        """A change: see `UnitOfWork`."""
        return UnitOfWork(
            self.primary,
            gate=self._gate,
            journal=self._journal,
            invalidator=self._invalidator,
            single_statement=single_statement,
        )

    async def read(self, written_at: float, query: Callable[[Connection], Awaitable[T]]) -> T:
        """`query`'s result, from the read replica when it has replayed the last write to
        what is read (`written_at`, a time from the response cache), else from the primary.
        When the replica fails, the primary answers this same read."""
        replica = self.replica
        if replica is not None and replica.serves(written_at):
            try:
                async with server_connection(replica.database, self._gate) as connection:
                    result = await query(connection)
            except DatabaseBusyError:
                pass  # busy is no fault: only this read moves
            except DatabaseUnavailableError as exc:
                replica.failed(exc.detail)
            except asyncpg.PostgresError as exc:
                # A hot standby cancels a query that conflicts with what it replays (40001,
                # 40P01): the standby is fine. Anything else (a rotated password, a schema
                # the standby has not replayed yet) keeps it out until a check succeeds.
                if exc.sqlstate not in RECOVERY_CONFLICTS:
                    replica.failed(type(exc).__name__)
            else:
                replica.served()
                return result
        async with server_connection(self.primary, self._gate) as connection:
            result = await query(connection)
        if replica is not None:
            replica.passed()
        return result
