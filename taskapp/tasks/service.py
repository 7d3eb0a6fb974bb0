"""Task rules: who may see and change which task, which views a change makes stale, and the
events it records."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from taskapp.auth.principal import Principal
from taskapp.database.connections import Database
from taskapp.dependencies import request_cache, request_database
from taskapp.errors import ForbiddenError
from taskapp.events.consumers.email import TASK_CREATED
from taskapp.events.event import NewEvent
from taskapp.redis.cache import RequestCache
from taskapp.tasks.errors import TaskNotFoundError
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.repository import TaskRepository, TaskRow
from taskapp.tasks.schemas import TaskCreate, TaskPage, TaskRead, TaskUpdate
from taskapp.tasks.views import view_of, views_changed


def _confined_to(principal: Principal) -> str | None:
    """The owner a caller is confined to; None for an admin, who sees every task."""
    return None if principal.is_admin else principal.subject


def _json(task: TaskRow) -> bytes:
    return TaskRead.model_validate(dict(task)).model_dump_json().encode()


class TaskReader:
    """Reads, answered with serialized JSON so a cache hit skips the database and the models.

    A connection is taken only to load a missed entry, and given back as soon as it is loaded;
    it is the read replica's when that has replayed the last write to the caller's view.
    """

    def __init__(self, database: Database, cache: RequestCache) -> None:
        self.database = database
        self.cache = cache

    async def list(
        self,
        principal: Principal,
        *,
        page: int,
        page_size: int,
        owner: str | None,
        status: TaskStatus | None,
    ) -> bytes:
        if principal.is_admin:
            confined = owner
        elif owner is None or owner == principal.subject:
            confined = principal.subject
        else:
            raise ForbiddenError("Only admins may list another owner's tasks")

        async def load(written_at: float) -> bytes:
            total, tasks = await self.database.read(
                written_at,
                lambda connection: TaskRepository(connection).list(
                    owner=confined,
                    status=status.value if status else None,
                    offset=(page - 1) * page_size,
                    limit=page_size,
                ),
            )
            # One validation of the whole page: a model per row costs half as much again.
            result = TaskPage.model_validate(
                {
                    "total": total,
                    "page": page,
                    "page_size": page_size,
                    "items": [dict(task) for task in tasks],
                }
            )
            return result.model_dump_json().encode()

        # The owner filter is part of the key, never of the view: an admin's filtered page
        # lives in the admin view, which every write makes stale.
        key = f"list:{page}:{page_size}:{status or ''}:{len(owner or '')}:{owner or ''}"
        return await self.cache.get_or_load(view_of(principal), key, load)

    async def get(self, principal: Principal, task_id: uuid.UUID) -> bytes:
        async def load(written_at: float) -> bytes:
            task = await self.database.read(
                written_at,
                lambda connection: TaskRepository(connection).get(
                    task_id, owner=_confined_to(principal)
                ),
            )
            if task is None:
                raise TaskNotFoundError()
            return _json(task)

        return await self.cache.get_or_load(view_of(principal), f"task:{task_id}", load)


class TaskService:
    """Changes. Each is one statement, so its unit of work commits it on its own, with the
    events it records inside it; only then are the views it touched forgotten and its events
    handed on. Each answers with the stored task's JSON."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def create(self, principal: Principal, data: TaskCreate) -> bytes:
        task_id = uuid.uuid4()
        owner = principal.subject
        async with self.database.unit_of_work(single_statement=True) as work:
            work.touches(*views_changed(owner))
            work.emit(
                NewEvent(
                    kind=TASK_CREATED,
                    aggregate_id=task_id,
                    owner=owner,
                    actor=principal.subject,
                    payload={
                        "title": data.title,
                        "description": data.description,
                        "status": data.status.value,
                        "email": principal.email,
                    },
                )
            )
            task = await TaskRepository(work).add(
                {
                    "id": task_id,
                    "owner": owner,
                    "title": data.title,
                    "description": data.description,
                    "status": data.status.value,
                }
            )
        return _json(task)

    async def update(self, principal: Principal, task_id: uuid.UUID, data: TaskUpdate) -> bytes:
        confined = _confined_to(principal)
        async with self.database.unit_of_work(single_statement=True) as work:
            if confined is not None:
                work.may_touch(*views_changed(confined))
            task = await TaskRepository(work).update(task_id, data.changes(), owner=confined)
            if task is not None:
                work.touches(*views_changed(task["owner"]))
        if task is None:
            raise TaskNotFoundError()
        return _json(task)

    async def delete(self, principal: Principal, task_id: uuid.UUID) -> None:
        confined = _confined_to(principal)
        async with self.database.unit_of_work(single_statement=True) as work:
            if confined is not None:
                work.may_touch(*views_changed(confined))
            owner = await TaskRepository(work).delete(task_id, owner=confined)
            if owner is not None:
                work.touches(*views_changed(owner))
        if owner is None:
            raise TaskNotFoundError()


# Both async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
async def get_task_reader(request: Request) -> TaskReader:
    return TaskReader(request_database(request), request_cache(request))


async def get_task_service(request: Request) -> TaskService:
    return TaskService(request_database(request))


TaskReaderDep = Annotated[TaskReader, Depends(get_task_reader)]
TaskServiceDep = Annotated[TaskService, Depends(get_task_service)]
