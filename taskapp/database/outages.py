"""Which failures mean the database cannot serve now, and the 503s they become."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import sqlalchemy.exc as sa_exc

from taskapp.errors import ServiceUnavailableError


class DatabaseUnavailableError(ServiceUnavailableError):
    """The database cannot serve the request now: down, unreachable, or shutting down."""

    code = "database_unavailable"
    summary = "The database is down or unreachable; nothing was changed"
    default_detail = "Database unavailable"


class DatabaseBusyError(DatabaseUnavailableError):
    """Every connection stayed in use for the pool timeout."""

    code = "database_busy"
    summary = "No database connection became free in time; nothing was changed"
    default_detail = "Database is busy: no connection became free in time"


class OutcomeUnknownError(DatabaseUnavailableError):
    """A change's statement was sent and its answer lost (a client-side timeout, a dropped
    connection): it may have committed, since a server that was paused, not gone, runs it
    when it resumes. The client should read before it retries."""

    code = "outcome_unknown"
    summary = "The database did not answer a change, which may or may not have been made"
    default_detail = "Database did not answer: the change may or may not have been made"


# SQLSTATEs of a hot standby cancelling a query that conflicts with what it replays.
RECOVERY_CONFLICTS = frozenset({"40001", "40P01"})
# statement_timeout: the server cancelled the statement, and rolled it back.
QUERY_CANCELED = "57014"


def unavailable(exc: BaseException) -> type[DatabaseUnavailableError] | None:
    """The outage `exc` stands for, or None when it is a real bug."""
    if isinstance(exc, sa_exc.TimeoutError):
        return DatabaseBusyError
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
        # The driver's own: the connection is closed, was lost mid-statement, or was left
        # mid-exchange by a server that went away ("another operation is in progress").
        return DatabaseUnavailableError
    if isinstance(exc, asyncpg.PostgresError):
        return _by_sqlstate(exc)
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        ):
            return DatabaseUnavailableError
        if type(exc.orig).__name__ in {"QueryCanceledError", "AdminShutdownError"}:
            return DatabaseUnavailableError
        return _by_sqlstate(exc.orig)
    # Plain OS errors: refused, reset, or timed out (a connect, or asyncpg's command timeout).
    if isinstance(exc, OSError):
        return DatabaseUnavailableError
    return None


def _by_sqlstate(error: object) -> type[DatabaseUnavailableError] | None:
    """The server's own word that it cannot serve now, whatever the driver's class for it:
    08 connection exception, 53 insufficient resources (too many connections), 57 operator
    intervention (a statement timeout; "the database system is shutting down" / "is starting
    up" while a connection is made, 57P03)."""
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str) and state[:2] in {"08", "53", "57"}:
        return DatabaseUnavailableError
    return None


@contextmanager
def outages_as_unavailable() -> Iterator[None]:
    """Database outages inside the block raise a `DatabaseUnavailableError` (a 503)."""
    try:
        yield
    except DatabaseUnavailableError:
        raise
    except Exception as exc:
        outage = unavailable(exc)
        if outage is not None:
            raise outage() from exc
        raise


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE the server failed `exc` with, raised by asyncpg or by SQLAlchemy."""
    error = getattr(exc, "orig", exc)
    value = getattr(error, "sqlstate", None)
    return value if isinstance(value, str) else None


@contextmanager
def unknown_outcomes() -> Iterator[None]:
    """Around a statement that commits as it returns: an outage while it runs is an
    `OutcomeUnknownError`, unless the server itself cancelled it (statement_timeout), which
    rolled it back."""
    try:
        yield
    except DatabaseUnavailableError:
        raise
    except Exception as exc:
        cancelled = sqlstate(exc) == QUERY_CANCELED
        if unavailable(exc) is DatabaseUnavailableError and not cancelled:
            raise OutcomeUnknownError() from exc
        raise
