"""HTTP routes for projects and their members."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from taskapp.auth.dependencies import UserPrincipal
from taskapp.database.outages import OutcomeUnknownError
from taskapp.dependencies import API_ERRORS
from taskapp.errors import BadRequestError, error_responses
from taskapp.membership.errors import (
    MemberNotFoundError,
    PersonalProjectError,
    ProjectNotFoundError,
    ProjectOwnerError,
)
from taskapp.projects.schemas import (
    MemberPut,
    MemberRead,
    ProjectCreate,
    ProjectPage,
    ProjectRead,
    ProjectUpdate,
    Transfer,
)
from taskapp.projects.service import ProjectServiceDep
from taskapp.tasks.router import MAX_PAGE
from taskapp.tasks.schemas import Owner
from taskapp.users.errors import UserNotFoundError

router = APIRouter(prefix="/projects", tags=["projects"])

_ONE = (*API_ERRORS, ProjectNotFoundError)
_CHANGE = (*_ONE, BadRequestError, OutcomeUnknownError)
_MEMBERSHIP = (
    *_CHANGE,
    PersonalProjectError,
    ProjectOwnerError,
    MemberNotFoundError,
    UserNotFoundError,
)
User = Annotated[
    Owner,
    Path(description="A member's subject, or a username or e-mail address the directory knows"),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectRead,
    responses=error_responses(*API_ERRORS, BadRequestError, OutcomeUnknownError),
)
async def create_project(
    body: ProjectCreate, principal: UserPrincipal, service: ProjectServiceDep
) -> ProjectRead:
    """Create a project owned by the caller, who is its admin."""
    return await service.create(principal, body)


@router.get("", response_model=ProjectPage, responses=error_responses(*API_ERRORS))
async def list_projects(
    principal: UserPrincipal,
    service: ProjectServiceDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")] = 1,
    page_size: Annotated[int, Query(ge=1, le=100, description="Projects per page")] = 10,
    member: Annotated[Owner | None, Query(description="Admins: one user's projects")] = None,
) -> ProjectPage:
    """The projects the caller is a member of, their Inbox included (admins: every project,
    or one member's), newest first."""
    return await service.page(principal, member=member, page=page, page_size=page_size)


@router.get("/{project_id}", response_model=ProjectRead, responses=error_responses(*_ONE))
async def get_project(
    project_id: uuid.UUID, principal: UserPrincipal, service: ProjectServiceDep
) -> ProjectRead:
    """Read a project (members)."""
    return await service.get(principal, project_id)


@router.patch(
    "/{project_id}",
    response_model=ProjectRead,
    responses=error_responses(*_CHANGE, PersonalProjectError),
)
async def update_project(
    project_id: uuid.UUID, body: ProjectUpdate, principal: UserPrincipal, service: ProjectServiceDep
) -> ProjectRead:
    """Rename, describe, archive or unarchive a project (project admins)."""
    return await service.update(principal, project_id, body)


@router.delete(
    "/{project_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(*_ONE, OutcomeUnknownError, PersonalProjectError),
)
async def delete_project(
    project_id: uuid.UUID, principal: UserPrincipal, service: ProjectServiceDep
) -> Response:
    """Delete a project and every task in it (its owner, or an admin)."""
    await service.delete(principal, project_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{project_id}/members", response_model=list[MemberRead], responses=error_responses(*_ONE)
)
async def list_members(
    project_id: uuid.UUID, principal: UserPrincipal, service: ProjectServiceDep
) -> list[MemberRead]:
    """The project's members and their roles (members)."""
    return await service.members(principal, project_id)


@router.put(
    "/{project_id}/members/{user}",
    response_model=MemberRead,
    responses=error_responses(*_MEMBERSHIP),
)
async def put_member(
    project_id: uuid.UUID,
    user: User,
    body: MemberPut,
    principal: UserPrincipal,
    service: ProjectServiceDep,
) -> MemberRead:
    """Add a member or change their role (project admins). The user must have called the
    API before (the directory knows them)."""
    return await service.put_member(principal, project_id, user, body.role)


@router.delete(
    "/{project_id}/members/{user}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(*_MEMBERSHIP),
)
async def remove_member(
    project_id: uuid.UUID, user: User, principal: UserPrincipal, service: ProjectServiceDep
) -> Response:
    """Remove a member (project admins; anyone may leave). Their assignments in the project
    end, and they lose access at once."""
    await service.remove_member(principal, project_id, user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{project_id}/transfer",
    response_model=ProjectRead,
    responses=error_responses(*_MEMBERSHIP),
)
async def transfer_project(
    project_id: uuid.UUID, body: Transfer, principal: UserPrincipal, service: ProjectServiceDep
) -> ProjectRead:
    """Give the project to another member (its owner only); its tasks move with it."""
    return await service.transfer(principal, project_id, body.owner)
