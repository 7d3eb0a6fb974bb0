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
from taskapp.tasks.errors import TaskNotFoundError
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.schemas import Owner, TaskCreate, TaskPage, TaskRead, TaskUpdate
from taskapp.tasks.service import TaskReaderDep, TaskServiceDep

_READ = error_responses(*API_ERRORS)
_READ_ONE = error_responses(*API_ERRORS, TaskNotFoundError)
_CREATE = error_responses(*API_ERRORS, BadRequestError, OutcomeUnknownError)
_CHANGE = error_responses(*API_ERRORS, BadRequestError, TaskNotFoundError, OutcomeUnknownError)
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
    """Create a task owned by the caller."""
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
) -> Response:
    """List the caller's tasks (all tasks for admins), newest first."""
    body = await reader.list(
        principal, page=page, page_size=page_size, owner=owner, status=task_status
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
    """Change any of a task's title, description and status."""
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
