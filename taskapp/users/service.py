"""The users directory: filled from the callers' tokens, searched by those who share work."""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated

from fastapi import Depends, Request

from taskapp.auth.middleware import authentication
from taskapp.auth.principal import Principal
from taskapp.database.connections import Database
from taskapp.database.driver import Record
from taskapp.database.outages import (
    DatabaseBusyError,
    DatabaseUnavailableError,
    OutcomeUnknownError,
)
from taskapp.dependencies import request_database
from taskapp.errors import invalid
from taskapp.state import state_of
from taskapp.users.errors import UserNotFoundError
from taskapp.users.repository import REFRESH_INTERVAL, UserRepository
from taskapp.users.schemas import UserRead

logger = logging.getLogger(__name__)
# Subjects remembered per process before the oldest are forgotten (and refreshed again).
_SEEN_LIMIT = 100_000


def user_json(row: Record) -> UserRead:
    return UserRead(id=row["sub"], username=row["username"], name=row["name"], email=row["email"])


async def remember_caller(request: Request) -> None:
    """Put the caller in the directory the first time this process sees them, and refresh
    their entry when their token's claims differ from what it last wrote (at most once a
    minute: the statement itself refreshes a row at most once a minute). Best effort: with
    the database out of reach the request goes on (a cached read needs no database)."""
    principal = authentication(request.scope)
    if not isinstance(principal, Principal):
        return
    state = state_of(request.scope)
    seen = state.directory_seen
    claims = (principal.username, principal.name, principal.email)
    last = seen.get(principal.subject)
    now = time.monotonic()
    if last is not None and (last[1] == claims or now - last[0] < REFRESH_INTERVAL):
        return
    writing = state.directory_writing
    if principal.subject in writing:
        # Another of their requests is writing it: one write, not one per request (a burst
        # of a new caller's requests would otherwise queue that many for a connection).
        return
    writing.add(principal.subject)
    try:
        # Outside the request's rate limit: a refresh is the service's own bookkeeping, and
        # counting it would make a request's answer depend on when its caller was last seen.
        await _remember(Database(state.database), principal)
    except (DatabaseUnavailableError, DatabaseBusyError, OutcomeUnknownError) as exc:
        logger.warning("users directory: %s not refreshed: %s", principal.subject, exc.detail)
        return
    finally:
        writing.discard(principal.subject)
    if len(seen) >= _SEEN_LIMIT:
        seen.clear()
    seen[principal.subject] = (now, claims)


async def _remember(database: Database, principal: Principal) -> None:
    async with database.unit_of_work(single_statement=True) as work:
        await UserRepository(work).remember(
            principal.subject,
            username=principal.username,
            name=principal.name,
            email=principal.email,
        )


class Directory:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def me(self, principal: Principal) -> UserRead:
        await _remember(self.database, principal)
        row = await self.database.read(
            math.inf, lambda connection: UserRepository(connection).get(principal.subject)
        )
        if row is None:  # removed between the two statements
            raise UserNotFoundError()
        return user_json(row)

    async def search(self, principal: Principal, query: str, *, limit: int) -> list[UserRead]:
        caller = None if principal.is_admin else principal.subject
        rows = await self.database.read(
            math.inf,
            lambda connection: UserRepository(connection).search(query, caller=caller, limit=limit),
        )
        return [user_json(row) for row in rows]


async def resolve_user(
    repository: UserRepository, name: str, location: tuple[str | int, ...]
) -> str:
    """The subject of the user `name` (at `location` in the input) means: a subject, a
    username or an e-mail address the directory knows; 404 when it knows none, 422 when
    several share it."""
    found = await repository.resolve(name)
    if not found:
        raise UserNotFoundError()
    if len(found) > 1:
        raise invalid(
            (location, "more than one user has that name: give their subject", "user_ambiguous")
        )
    return found[0]


async def get_directory(request: Request) -> Directory:
    await remember_caller(request)
    return Directory(request_database(request))


DirectoryDep = Annotated[Directory, Depends(get_directory)]
