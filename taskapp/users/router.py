"""HTTP routes of the users directory."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from taskapp.auth.dependencies import UserPrincipal
from taskapp.dependencies import API_ERRORS
from taskapp.errors import error_responses
from taskapp.users.errors import UserNotFoundError
from taskapp.users.schemas import UserRead
from taskapp.users.service import DirectoryDep

router = APIRouter(prefix="/users", tags=["users"])


@router.get(
    "/me", response_model=UserRead, responses=error_responses(*API_ERRORS, UserNotFoundError)
)
async def read_me(principal: UserPrincipal, directory: DirectoryDep) -> UserRead:
    """The caller as the directory knows them, refreshed from this request's token."""
    return await directory.me(principal)


@router.get("", response_model=list[UserRead], responses=error_responses(*API_ERRORS))
async def search_users(
    principal: UserPrincipal,
    directory: DirectoryDep,
    q: Annotated[
        str,
        Query(
            max_length=320,
            pattern="^[^\\x00]*$",
            description="Prefix of a username, name or e-mail address (any case); empty: all",
        ),
    ] = "",
    limit: Annotated[int, Query(ge=1, le=100, description="Users at most")] = 20,
) -> list[UserRead]:
    """People who share a project with the caller (admins: everyone), matched by the
    beginning of their username, name or e-mail address."""
    return await directory.search(principal, q, limit=limit)
