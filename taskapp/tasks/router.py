"""HTTP routes for tasks: parse, authorize, call one service method, return."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from taskapp.auth.dependencies import AdminPrincipal, UserPrincipal
from taskapp.database.outages import OutcomeUnknownError
from taskapp.dependencies import API_ERRORS
from taskapp.errors import BadRequestError, error_responses
from taskapp.http.responses import json_bytes
from taskapp.http.routing import lean_route
from taskapp.membership.errors import ProjectArchivedError, ProjectNotFoundError
from taskapp.tasks.errors import TaskNotFoundError
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.schemas import Owner, TaskCreate, TaskPage, TaskRead, TaskUpdate
from taskapp.tasks.service import TaskReaderDep, TaskServiceDep

_READ = error_responses(*API_ERRORS, ProjectNotFoundError)
_READ_ONE = error_responses(*API_ERRORS, TaskNotFoundError)
_CREATE = error_responses(
    *API_ERRORS,
    BadRequestError,
    OutcomeUnknownError,
    ProjectNotFoundError,
    ProjectArchivedError,
)
_CHANGE = error_responses(
    *API_ERRORS,
    BadRequestError,
    TaskNotFoundError,
    OutcomeUnknownError,
    ProjectNotFoundError,
    ProjectArchivedError,
)
_DELETE = error_responses(*API_ERRORS, TaskNotFoundError, OutcomeUnknownError)

router = APIRouter(prefix="/tasks", tags=["tasks"])

MAX_PAGE = 1_000_000


@lean_route(
    router,
    "POST",
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskRead,
    responses=_CREATE,
)
async def create_task(
    body: TaskCreate, principal: UserPrincipal, service: TaskServiceDep
) -> Response:
    """Create a task: in the caller's Inbox, or in `project_id` (editors), optionally
    assigned to members of that project (each assignee is e-mailed)."""
    return json_bytes(await service.create(principal, body), status.HTTP_201_CREATED)


@lean_route(router, "GET", "", response_model=TaskPage, responses=_READ)
async def list_tasks(
    principal: UserPrincipal,
    reader: TaskReaderDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")] = 1,
    page_size: Annotated[int, Query(ge=1, le=100, description="Tasks per page")] = 10,
    owner: Annotated[Owner | None, Query(description="Admins only: one owner's tasks")] = None,
    task_status: Annotated[
        TaskStatus | None, Query(alias="status", description="Only tasks in this status")
    ] = None,
    project: Annotated[uuid.UUID | None, Query(description="Only this project's tasks")] = None,
    assignee: Annotated[
        Owner | None,
        Query(description="`me`, `none`, or a user (subject, username or e-mail address)"),
    ] = None,
    created_by: Annotated[
        Owner | None, Query(description="`me` or a user's subject: who created the task")
    ] = None,
) -> Response:
    """List the tasks the caller can see (their Inbox and every project they are a member
    of; all tasks for admins), newest first."""
    body = await reader.list(
        principal,
        page=page,
        page_size=page_size,
        owner=owner,
        status=task_status,
        project=project,
        assignee=assignee,
        created_by=created_by,
    )
    return json_bytes(body)


@lean_route(router, "GET", "/{task_id}", response_model=TaskRead, responses=_READ_ONE)
async def get_task(task_id: uuid.UUID, principal: UserPrincipal, reader: TaskReaderDep) -> Response:
    """Read one task."""
    return json_bytes(await reader.get(principal, task_id))


@lean_route(router, "PATCH", "/{task_id}", response_model=TaskRead, responses=_CHANGE)
async def update_task(
    task_id: uuid.UUID, body: TaskUpdate, principal: UserPrincipal, service: TaskServiceDep
) -> Response:
    """Change any of a task's title, description and status (editors of its project), move
    it to another project (`project_id`: editor in both), or replace its assignees."""
    return json_bytes(await service.update(principal, task_id, body))


@lean_route(
    router, "DELETE", "/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_DELETE
)
async def delete_task(
    task_id: uuid.UUID, principal: AdminPrincipal, service: TaskServiceDep
) -> Response:
    """Delete a task (admins only)."""
    await service.delete(principal, task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
