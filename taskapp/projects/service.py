"""Project rules: who may read, change, share, transfer and delete a project, and which
cached task views each change makes stale."""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any

from fastapi import Depends, Request

from taskapp.auth.principal import Principal
from taskapp.database.connections import Database
from taskapp.database.driver import Record
from taskapp.database.unit_of_work import UnitOfWork
from taskapp.dependencies import request_database
from taskapp.errors import ForbiddenError
from taskapp.membership.access import allowed
from taskapp.membership.errors import (
    MemberNotFoundError,
    PersonalProjectError,
    ProjectOwnerError,
    not_members,
)
from taskapp.membership.models import ProjectRole
from taskapp.membership.repository import Lock, MembershipRepository
from taskapp.projects.schemas import (
    MemberRead,
    ProjectCreate,
    ProjectPage,
    ProjectRead,
    ProjectUpdate,
)
from taskapp.tasks.repository import TaskRepository
from taskapp.tasks.views import views_changed
from taskapp.users.repository import UserRepository
from taskapp.users.service import remember_caller, resolve_user


def _project(row: Record, role: str | None) -> ProjectRead:
    return ProjectRead.model_validate({**dict(row), "role": role})


def _member(row: Record, owner: str) -> MemberRead:
    return MemberRead(
        user=row["user_id"],
        role=row["role"],
        owner=row["user_id"] == owner,
        username=row["username"],
        name=row["name"],
        email=row["email"],
        added_at=row["created_at"],
    )


class ProjectService:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def _read(self, principal: Principal, project_id: uuid.UUID) -> Record:
        project = await self.database.read(
            math.inf,
            lambda connection: MembershipRepository(connection).access(
                project_id, principal.subject
            ),
        )
        return allowed(principal, project, ProjectRole.VIEWER)

    async def create(self, principal: Principal, data: ProjectCreate) -> ProjectRead:
        async with self.database.unit_of_work() as work:
            row = await MembershipRepository(work).add_project(
                {
                    "id": uuid.uuid4(),
                    "owner": principal.subject,
                    "name": data.name,
                    "description": data.description,
                }
            )
            # The caller's view: what they may read has grown.
            work.touches(*views_changed((principal.subject,)))
        return _project(row, ProjectRole.ADMIN.value)

    async def page(
        self, principal: Principal, *, member: str | None, page: int, page_size: int
    ) -> ProjectPage:
        if not principal.is_admin:
            if member is not None and member != principal.subject:
                raise ForbiddenError("Only admins may list another user's projects")
            member = principal.subject
        total, rows = await self.database.read(
            math.inf,
            lambda connection: MembershipRepository(connection).page(
                member=member, offset=(page - 1) * page_size, limit=page_size
            ),
        )
        mine = member == principal.subject
        return ProjectPage(
            total=total,
            page=page,
            page_size=page_size,
            items=[_project(row, row["role"] if mine else None) for row in rows],
        )

    async def get(self, principal: Principal, project_id: uuid.UUID) -> ProjectRead:
        project = await self._read(principal, project_id)
        return _project(project, project["role"])

    async def update(
        self, principal: Principal, project_id: uuid.UUID, data: ProjectUpdate
    ) -> ProjectRead:
        changes = data.changes()
        async with self.database.unit_of_work() as work:
            memberships, project = await _locked(
                work, principal, project_id, ProjectRole.ADMIN, "update"
            )
            if project["personal"] and changes.get("archived"):
                raise PersonalProjectError()
            row = await memberships.update_project(project_id, changes)
        return _project(row, project["role"])

    async def delete(self, principal: Principal, project_id: uuid.UUID) -> None:
        async with self.database.unit_of_work() as work:
            memberships, project = await _locked(
                work, principal, project_id, ProjectRole.VIEWER, "update"
            )
            if not principal.is_admin and project["owner"] != principal.subject:
                raise ForbiddenError("Only the project's owner (or an admin) may delete it")
            if project["personal"]:
                raise PersonalProjectError()
            await TaskRepository(work).delete_project(project["owner"], project_id)
            await memberships.delete_project(project_id)
            work.touches(*views_changed(project["audience"]))

    async def members(self, principal: Principal, project_id: uuid.UUID) -> list[MemberRead]:
        project = await self._read(principal, project_id)
        rows = await self.database.read(
            math.inf, lambda connection: UserRepository(connection).members(project_id)
        )
        return [_member(row, project["owner"]) for row in rows]

    async def put_member(
        self, principal: Principal, project_id: uuid.UUID, user: str, role: ProjectRole
    ) -> MemberRead:
        async with self.database.unit_of_work() as work:
            memberships, project = await _locked(work, principal, project_id, ProjectRole.ADMIN)
            if project["personal"]:
                raise PersonalProjectError()
            subject = await resolve_user(UserRepository(work), user, ("path", "user"))
            if subject == project["owner"]:
                raise ProjectOwnerError()
            await memberships.put_member(project_id, subject, project["owner"], role)
            (row,) = await UserRepository(work).members(project_id, only=[subject])
            # The new member sees the project's tasks at once.
            work.touches(*views_changed((subject,)))
        return _member(row, project["owner"])

    async def remove_member(self, principal: Principal, project_id: uuid.UUID, user: str) -> None:
        async with self.database.unit_of_work() as work:
            memberships, project = await _locked(work, principal, project_id, ProjectRole.VIEWER)
            subject = await resolve_user(UserRepository(work), user, ("path", "user"))
            if subject != principal.subject:  # anyone may leave; others need a project admin
                allowed(principal, project, ProjectRole.ADMIN)
            if subject == project["owner"]:
                raise ProjectOwnerError()
            if not await memberships.remove_member(project_id, subject):
                raise MemberNotFoundError()
            await TaskRepository(work).end_assignments(project["owner"], project_id, subject)
            # Every member's view (assignments ended), and the removed one's (at once).
            work.touches(*views_changed(project["audience"]))

    async def transfer(self, principal: Principal, project_id: uuid.UUID, user: str) -> ProjectRead:
        async with self.database.unit_of_work() as work:
            memberships, project = await _locked(
                work, principal, project_id, ProjectRole.VIEWER, "update"
            )
            if project["owner"] != principal.subject:
                raise ForbiddenError("Only the project's owner may transfer it")
            if project["personal"]:
                raise PersonalProjectError()
            subject = await resolve_user(UserRepository(work), user, ("body", "owner"))
            if subject not in project["audience"]:
                raise not_members((("body", "owner"), user))
            await _move(work, project, subject)
            row = await memberships.transfer(project_id, subject)
            work.touches(*views_changed(project["audience"]))
        return _project(row, ProjectRole.ADMIN.value)


async def _locked(
    work: UnitOfWork[Any],
    principal: Principal,
    project_id: uuid.UUID,
    needed: ProjectRole,
    lock: Lock = "share",
) -> tuple[MembershipRepository, Record]:
    """The project, held as `lock` says until `work` commits, if the caller holds `needed`
    in it (see `_allowed`)."""
    memberships = MembershipRepository(work)
    project = await memberships.access(project_id, principal.subject, lock=lock)
    return memberships, allowed(principal, project, needed)


async def _move(work: UnitOfWork[Any], project: Record, owner: str) -> None:
    """The project's tasks to the partition of their new owner."""
    if owner != project["owner"]:
        await TaskRepository(work).move_tenant(project["owner"], project["id"], owner)


async def get_project_service(request: Request) -> ProjectService:
    await remember_caller(request)
    return ProjectService(request_database(request))


ProjectServiceDep = Annotated[ProjectService, Depends(get_project_service)]
