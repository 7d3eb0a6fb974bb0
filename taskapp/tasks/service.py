"""Task rules: who may see and change which task."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends

from taskapp.auth.principal import Principal
from taskapp.db import SessionDep
from taskapp.errors import ForbiddenError, NotFoundError
from taskapp.tasks.models import Task, TaskStatus
from taskapp.tasks.repository import TaskRepository
from taskapp.tasks.schemas import TaskCreate, TaskPage, TaskRead, TaskUpdate

TASK_NOT_FOUND = "Task not found"


def _scope(principal: Principal) -> str | None:
    """The owner a caller is confined to; None for an admin, who sees every task."""
    return None if principal.is_admin else principal.subject


class TaskService:
    def __init__(self, repository: TaskRepository) -> None:
        self.repository = repository

    async def create(self, principal: Principal, data: TaskCreate) -> Task:
        task = Task(
            id=uuid.uuid4(),
            owner=principal.subject,
            title=data.title,
            description=data.description,
            status=data.status.value,
        )
        return await self.repository.add(task)

    async def list(
        self,
        principal: Principal,
        *,
        page: int,
        page_size: int,
        owner: str | None,
        status: TaskStatus | None,
    ) -> TaskPage:
        if principal.is_admin:
            scope = owner
        elif owner is None or owner == principal.subject:
            scope = principal.subject
        else:
            raise ForbiddenError("Only admins may list another owner's tasks")
        total, tasks = await self.repository.list(
            owner=scope,
            status=status.value if status else None,
            offset=(page - 1) * page_size,
            limit=page_size,
        )
        return TaskPage(
            total=total,
            page=page,
            page_size=page_size,
            items=[TaskRead.model_validate(task) for task in tasks],
        )

    async def get(self, principal: Principal, task_id: uuid.UUID) -> Task:
        task = await self.repository.get(task_id, owner=_scope(principal))
        if task is None:
            raise NotFoundError(TASK_NOT_FOUND)
        return task

    async def update(self, principal: Principal, task_id: uuid.UUID, data: TaskUpdate) -> Task:
        task = await self.repository.update(task_id, data.changes(), owner=_scope(principal))
        if task is None:
            raise NotFoundError(TASK_NOT_FOUND)
        return task

    async def delete(self, principal: Principal, task_id: uuid.UUID) -> None:
        if not await self.repository.delete(task_id, owner=_scope(principal)):
            raise NotFoundError(TASK_NOT_FOUND)


def get_task_service(session: SessionDep) -> TaskService:
    return TaskService(TaskRepository(session))


TaskServiceDep = Annotated[TaskService, Depends(get_task_service)]
