"""Every statement on `projects` and `project_members`, and the conditions other resources use
to read only what a caller may see."""

from __future__ import annotations

import uuid
from functools import cache, lru_cache
from typing import Any, Literal, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert

from taskapp.database.driver import Record
from taskapp.database.unit_of_work import Executor
from taskapp.membership.models import INBOX_NAME, Member, Project, ProjectRole, inbox_id

PROJECTS = cast(Table, Project.__table__)
# How a change holds the project it reads (see `MembershipRepository.access`).
Lock = Literal["share", "update"]
MEMBERS = cast(Table, Member.__table__)


def projects_of(viewer: str, *, editing: bool = False) -> Select[Any]:
    """The ids of the projects `viewer` is a member of (of those they may edit)."""
    query = select(MEMBERS.c.project_id).where(MEMBERS.c.user_id == bindparam(viewer))
    if editing:
        query = query.where(MEMBERS.c.role != ProjectRole.VIEWER.value)
    return query


def audience(project_id: ColumnElement[Any]) -> ColumnElement[Any]:
    """Every member of the project `project_id`: whose views a change to its tasks touches."""
    members = select(MEMBERS.c.user_id).where(MEMBERS.c.project_id == project_id)
    return func.array(members.scalar_subquery()).label("audience")


@cache
def inbox_inserts() -> tuple[Any, ...]:
    """The inserts that create a user's Inbox and membership unless they exist, as CTEs for
    a statement that puts a task in it (bound by `inbox_parameters`)."""
    project = (
        insert(PROJECTS)
        .values(
            id=bindparam("inbox_id"),
            owner=bindparam("inbox_owner"),
            name=INBOX_NAME,
            personal=True,
        )
        .on_conflict_do_nothing()
    )
    member = (
        insert(MEMBERS)
        .values(
            project_id=bindparam("inbox_id"),
            user_id=bindparam("inbox_owner"),
            owner=bindparam("inbox_owner"),
            role=ProjectRole.ADMIN.value,
        )
        .on_conflict_do_nothing()
    )
    return project.cte("inbox_project"), member.cte("inbox_member")


def inbox_parameters(subject: str) -> dict[str, Any]:
    return {"inbox_id": inbox_id(subject), "inbox_owner": subject}


@cache
def _access_statement(*, lock: Lock | None) -> Select[Any]:
    """A project's settings, the caller's role in it (NULL: not a member), and its members."""
    role = (
        select(MEMBERS.c.role)
        .where(MEMBERS.c.project_id == PROJECTS.c.id, MEMBERS.c.user_id == bindparam("caller"))
        .scalar_subquery()
        .label("role")
    )
    statement = select(PROJECTS, role, audience(PROJECTS.c.id)).where(
        PROJECTS.c.id == bindparam("project_id")
    )
    if lock is None:
        return statement
    return statement.with_for_update(read=lock == "share")


@cache
def _list_statement(*, member: bool) -> Select[Any]:
    """A page of projects with the total, newest first; `member`: only those of one user,
    with their role."""
    role = MEMBERS.c.role if member else literal(None).label("role")
    conditions: list[ColumnElement[bool]] = []
    source: Any = PROJECTS
    if member:
        source = PROJECTS.join(
            MEMBERS,
            and_(MEMBERS.c.project_id == PROJECTS.c.id, MEMBERS.c.user_id == bindparam("member")),
        )
    total = select(func.count().label("total")).select_from(source).where(*conditions)
    page = (
        select(PROJECTS, role)
        .select_from(source)
        .order_by(PROJECTS.c.created_at.desc(), PROJECTS.c.id.desc())
        .offset(bindparam("offset", type_=Integer))
        .limit(bindparam("limit", type_=Integer))
        .subquery("page")
    )
    counted = total.subquery("counted")
    return (
        select(counted.c.total, page)
        .select_from(counted.outerjoin(page, true()))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


class MembershipRepository:
    """Projects and members, on a read's connection or a change's unit of work."""

    def __init__(self, connection: Executor) -> None:
        self.connection = connection

    async def memberships(self, user: str) -> list[Record]:
        """`project_id`, `owner` and `role` of every project `user` is a member of."""
        return await self.connection.fetch(_memberships_statement(), {"user": user})

    async def access(
        self, project_id: uuid.UUID, caller: str, *, lock: Lock | None = None
    ) -> Record | None:
        """The project (with `role`: the caller's, or None, and `audience`: its members).
        `lock`: "share" keeps it from changing owner or going until the change commits
        (others may share it: a change to its tasks); "update" keeps it for this change
        alone (a change to the project: its settings, owner, existence)."""
        rows = await self.connection.fetch(
            _access_statement(lock=lock), {"project_id": project_id, "caller": caller}
        )
        return rows[0] if rows else None

    async def page(
        self, *, member: str | None, offset: int, limit: int
    ) -> tuple[int, list[Record]]:
        parameters: dict[str, Any] = {"offset": offset, "limit": limit}
        if member is not None:
            parameters["member"] = member
        rows = await self.connection.fetch(_list_statement(member=member is not None), parameters)
        return rows[0]["total"], [row for row in rows if row["id"] is not None]

    async def add_project(self, values: dict[str, Any]) -> Record:
        (row,) = await self.connection.fetch(_insert_project(frozenset(values)), _values(values))
        await self.put_member(values["id"], values["owner"], values["owner"], ProjectRole.ADMIN)
        return row

    async def update_project(self, project_id: uuid.UUID, values: dict[str, Any]) -> Record:
        statement = _update_project(frozenset(values))
        (row,) = await self.connection.fetch(statement, {"match_id": project_id, **_values(values)})
        return row

    async def delete_project(self, project_id: uuid.UUID) -> None:
        await self.connection.fetch(_delete_project(), {"match_id": project_id})

    async def put_member(
        self, project_id: uuid.UUID, user: str, owner: str, role: ProjectRole
    ) -> Record:
        (row,) = await self.connection.fetch(
            _put_member(),
            {"project_id": project_id, "user": user, "owner": owner, "role": role.value},
        )
        return row

    async def remove_member(self, project_id: uuid.UUID, user: str) -> bool:
        rows = await self.connection.fetch(
            _remove_member(), {"project_id": project_id, "user": user}
        )
        return bool(rows)

    async def transfer(self, project_id: uuid.UUID, owner: str) -> Record:
        """Make `owner` (a member) the owner: the project, every member row's tenant, and
        the new owner's role (`admin`). The tasks move with `TaskRepository.move_tenant`."""
        await self.connection.fetch(
            _transfer_members(), {"match_id": project_id, "new_owner": owner}
        )
        return await self.update_project(project_id, {"owner": owner})


@cache
def _memberships_statement() -> Select[Any]:
    return select(MEMBERS.c.project_id, MEMBERS.c.owner, MEMBERS.c.role).where(
        MEMBERS.c.user_id == bindparam("user")
    )


@cache
def _delete_project() -> Any:
    return delete(PROJECTS).where(PROJECTS.c.id == bindparam("match_id"))


@cache
def _put_member() -> Any:
    return (
        insert(MEMBERS)
        .values(
            project_id=bindparam("project_id"),
            user_id=bindparam("user"),
            owner=bindparam("owner"),
            role=bindparam("role"),
        )
        .on_conflict_do_update(
            index_elements=[MEMBERS.c.project_id, MEMBERS.c.user_id],
            set_={"role": bindparam("role")},
        )
        .returning(MEMBERS)
    )


@cache
def _remove_member() -> Any:
    return (
        delete(MEMBERS)
        .where(MEMBERS.c.project_id == bindparam("project_id"))
        .where(MEMBERS.c.user_id == bindparam("user"))
        .returning(MEMBERS.c.user_id)
    )


@cache
def _transfer_members() -> Any:
    """Every member row takes the new tenant; the new owner becomes `admin`."""
    new_role = case(
        (MEMBERS.c.user_id == bindparam("new_owner"), ProjectRole.ADMIN.value),
        else_=MEMBERS.c.role,
    )
    return (
        update(MEMBERS)
        .where(MEMBERS.c.project_id == bindparam("match_id"))
        .values(owner=bindparam("new_owner"), role=new_role)
    )


@lru_cache(maxsize=32)
def _insert_project(columns: frozenset[str]) -> Any:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in sorted(columns)}
    return insert(PROJECTS).values(values).returning(PROJECTS)


@lru_cache(maxsize=32)
def _update_project(columns: frozenset[str]) -> Any:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in sorted(columns)}
    return (
        update(PROJECTS)
        .where(PROJECTS.c.id == bindparam("match_id"))
        .values({**values, "updated_at": func.now()})
        .returning(PROJECTS)
    )


def _values(values: dict[str, Any]) -> dict[str, Any]:
    return {f"new_{name}": value for name, value in values.items()}
