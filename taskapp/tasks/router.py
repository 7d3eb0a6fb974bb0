"""HTTP routes for tasks: parse, authorize, call one service method, return."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import JSONResponse

from taskapp.auth.dependencies import AdminPrincipal, UserPrincipal
from taskapp.errors import error_responses
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.schemas import Owner, TaskCreate, TaskPage, TaskRead, TaskUpdate
from taskapp.tasks.service import TaskReaderDep, TaskServiceDep

router = APIRouter(prefix="/tasks", tags=["tasks"], responses=error_responses(401, 403, 429, 503))

MAX_PAGE = 1_000_000


def json_bytes(body: bytes, status_code: int = status.HTTP_200_OK) -> Response:
    """A JSON response from bytes serialized (and perhaps cached) by the service."""
    return Response(content=body, status_code=status_code, media_type=JSONResponse.media_type)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskRead,
    responses=error_responses(400),
)
async def create_task(
    body: TaskCreate, principal: UserPrincipal, service: TaskServiceDep
) -> Response:
    """Create a task owned by the caller."""
    return json_bytes(await service.create(principal, body), status.HTTP_201_CREATED)


@router.get("", response_model=TaskPage)
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


@router.get("/{task_id}", response_model=TaskRead, responses=error_responses(404))
async def get_task(task_id: uuid.UUID, principal: UserPrincipal, reader: TaskReaderDep) -> Response:
    """Read one task."""
    return json_bytes(await reader.get(principal, task_id))


@router.patch("/{task_id}", response_model=TaskRead, responses=error_responses(400, 404))
async def update_task(
    task_id: uuid.UUID, body: TaskUpdate, principal: UserPrincipal, service: TaskServiceDep
) -> Response:
    """Change any of a task's title, description and status."""
    return json_bytes(await service.update(principal, task_id, body))


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404))
async def delete_task(
    task_id: uuid.UUID, principal: AdminPrincipal, service: TaskServiceDep
) -> Response:
    """Delete a task (admins only)."""
    await service.delete(principal, task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
