"""Every statement on `users`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import cache
from typing import Any, cast

from sqlalchemy import (
    Integer,
    Select,
    String,
    Table,
    bindparam,
    func,
    literal,
    literal_column,
    or_,
    select,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert

from taskapp.database.driver import Record
from taskapp.database.unit_of_work import Executor
from taskapp.membership.models import Member
from taskapp.membership.repository import inbox_inserts, inbox_parameters
from taskapp.users.models import User

_USERS = cast(Table, User.__table__)
_MEMBERS = cast(Table, Member.__table__)
# How often a user's entry is refreshed from their token's claims, at most.
REFRESH_INTERVAL = 60


@cache
def _remember_statement() -> Any:
    """Insert the caller, or refresh their entry when it is older than the interval; with
    their Inbox made on the way, so that it exists from their first call."""
    values: dict[str, Any] = {
        "sub": bindparam("sub"),
        "username": bindparam("username"),
        "name": bindparam("name"),
        "email": bindparam("email"),
    }
    statement = insert(_USERS).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=[_USERS.c.sub],
        set_={
            "username": statement.excluded.username,
            "name": statement.excluded.name,
            "email": statement.excluded.email,
            "refreshed_at": func.now(),
        },
        where=_USERS.c.refreshed_at
        <= func.now() - literal_column(f"interval '{REFRESH_INTERVAL} seconds'"),
    )
    for cte in inbox_inserts():
        statement = statement.add_cte(cte)
    return statement


@cache
def _get_statement() -> Select[Any]:
    return select(_USERS).where(_USERS.c.sub == bindparam("sub"))


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@cache
def _search_statement(*, everyone: bool) -> Select[Any]:
    prefix: Any = bindparam("prefix")
    statement = (
        select(_USERS)
        .where(
            or_(
                *(
                    func.lower(column).like(prefix, escape="\\")
                    for column in (_USERS.c.username, _USERS.c.email, _USERS.c.name)
                )
            )
        )
        .order_by(_USERS.c.username.nulls_last(), _USERS.c.sub)
        .limit(bindparam("limit", type_=Integer))
    )
    if not everyone:  # those who share a project with the caller
        mine = select(_MEMBERS.c.project_id).where(_MEMBERS.c.user_id == bindparam("caller"))
        peers = select(_MEMBERS.c.user_id).where(_MEMBERS.c.project_id.in_(mine))
        statement = statement.where(_USERS.c.sub.in_(peers))
    return statement


@cache
def _resolve_statement() -> Any:
    """The entries a name may mean, best first: the subject itself, then a username, then an
    e-mail address (both without regard to case)."""
    name = bindparam("name", type_=String(320))
    tiers = [
        select(_USERS.c.sub, literal(rank).label("rank")).where(condition)
        for rank, condition in enumerate(
            (
                _USERS.c.sub == name,
                func.lower(_USERS.c.username) == func.lower(name),
                func.lower(_USERS.c.email) == func.lower(name),
            )
        )
    ]
    return union_all(*tiers)


@cache
def _members_statement(*, only: bool, lock: bool) -> Select[Any]:
    statement = (
        select(
            _MEMBERS.c.user_id,
            _MEMBERS.c.role,
            _MEMBERS.c.created_at,
            _USERS.c.username,
            _USERS.c.name,
            _USERS.c.email,
        )
        .select_from(_MEMBERS.outerjoin(_USERS, _USERS.c.sub == _MEMBERS.c.user_id))
        .where(_MEMBERS.c.project_id == bindparam("project_id"))
        .order_by(_MEMBERS.c.created_at, _MEMBERS.c.user_id)
    )
    if only:
        statement = statement.where(
            _MEMBERS.c.user_id == func.any(bindparam("users", type_=ARRAY(String(255))))
        )
    if lock:
        statement = statement.with_for_update(of=_MEMBERS, key_share=True, read=True)
    return statement


class UserRepository:
    def __init__(self, connection: Executor) -> None:
        self.connection = connection

    async def remember(
        self, sub: str, *, username: str | None, name: str | None, email: str | None
    ) -> None:
        parameters = {"sub": sub, "username": username, "name": name, "email": email}
        await self.connection.fetch(_remember_statement(), {**parameters, **inbox_parameters(sub)})

    async def get(self, sub: str) -> Record | None:
        rows = await self.connection.fetch(_get_statement(), {"sub": sub})
        return rows[0] if rows else None

    async def search(self, prefix: str, *, caller: str | None, limit: int) -> list[Record]:
        """Users whose username, e-mail or name starts with `prefix` (any case); only those
        who share a project with `caller` unless that is None."""
        parameters: dict[str, Any] = {"prefix": _escaped(prefix.lower()) + "%", "limit": limit}
        if caller is not None:
            parameters["caller"] = caller
        return await self.connection.fetch(_search_statement(everyone=caller is None), parameters)

    async def members(
        self, project_id: uuid.UUID, *, only: Sequence[str] | None = None, lock: bool = False
    ) -> list[Record]:
        """The members with their directory entries; `only` those of `only`; `lock`: kept
        members until the change commits (an assignment must not outlive a removal)."""
        parameters: dict[str, Any] = {"project_id": project_id}
        if only is not None:
            parameters["users"] = list(only)
        statement = _members_statement(only=only is not None, lock=lock)
        return await self.connection.fetch(statement, parameters)

    async def resolve(self, name: str) -> list[str]:
        """The subjects `name` (a subject, a username or an e-mail address) means: one, none,
        or several when it is ambiguous."""
        rows = await self.connection.fetch(_resolve_statement(), {"name": name})
        if not rows:
            return []
        best = min(row["rank"] for row in rows)
        return sorted({row["sub"] for row in rows if row["rank"] == best})
