"""What a request's handlers work with, built from the application's state for that request:
its database (with its rate limit still to pass before the first statement), its response
cache, and the errors any of it can answer with."""

from __future__ import annotations

from fastapi import Request

from taskapp.auth.errors import (
    InvalidTokenError,
    NotAuthenticatedError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    TokenExpiredError,
)
from taskapp.database.connections import Database
from taskapp.database.outages import DatabaseBusyError, DatabaseUnavailableError
from taskapp.errors import ErrorKind, ForbiddenError, ValidationFailed
from taskapp.ratelimit.check import RateLimitedError, RateLimiterUnavailableError
from taskapp.ratelimit.middleware import pending_check
from taskapp.redis.cache import RequestCache
from taskapp.state import state_of


def request_database(request: Request) -> Database:
    """The database for `request`: the primary and the replica, units of work whose events go
    to the outbox and whose views the cache forgets."""
    state = state_of(request.scope)
    check = pending_check(request.scope)
    return Database(
        state.database,
        state.replica,
        gate=check.enforce if check is not None else None,
        journal=state.outbox,
        invalidator=state.cache,
    )


def request_cache(request: Request) -> RequestCache:
    """The response cache for `request`: its first lookup also counts the request's rate
    limit, while that is still to be counted."""
    return RequestCache(state_of(request.scope).cache, pending_check(request.scope))


# What any authenticated operation can answer besides its own errors: the token, the role,
# the input, the rate limit, and the services behind it.
API_ERRORS: tuple[ErrorKind, ...] = (
    NotAuthenticatedError,
    InvalidTokenError,
    TokenExpiredError,
    ForbiddenError,
    ValidationFailed,
    RateLimitedError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    DatabaseUnavailableError,
    DatabaseBusyError,
    RateLimiterUnavailableError,
)
