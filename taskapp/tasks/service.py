"""Task rules: who may see and change which task, and the cache in front of the reads."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from taskapp.auth.principal import Principal
from taskapp.cache import ResponseCache
from taskapp.db import OUTCOME_UNKNOWN, Connections, ConnectionsDep, DatabaseUnavailableError
from taskapp.errors import ForbiddenError, NotFoundError
from taskapp.notifications.outbox import Outbox
from taskapp.ratelimit import RateLimitCheck, deferred_check
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.repository import TaskRepository, TaskRow
from taskapp.tasks.schemas import TaskCreate, TaskPage, TaskRead, TaskUpdate

TASK_NOT_FOUND = "Task not found"
ADMIN_VIEW = "admin"


def _owner_view(owner: str) -> str:
    return f"owner:{owner}"


def _scope(principal: Principal) -> str | None:
    """The owner a caller is confined to; None for an admin, who sees every task."""
    return None if principal.is_admin else principal.subject


def _view(principal: Principal) -> str:
    """The cache scope of what the caller can see: their own tasks, or everything."""
    return ADMIN_VIEW if principal.is_admin else _owner_view(principal.subject)


def _json(task: TaskRow) -> bytes:
    return TaskRead.model_validate(task).model_dump_json().encode()


class TaskReader:
    """Reads, answered with serialized JSON so a cache hit skips the database and the models.

    A connection is taken only to load a missed entry, and given back as soon as it is loaded;
    it is the read replica's when that has replayed the last write to the caller's view.
    """

    def __init__(
        self,
        connections: Connections,
        cache: ResponseCache,
        rate_check: RateLimitCheck | None = None,
    ) -> None:
        self.connections = connections
        self.cache = cache
        # The request's rate limit when it is still to be counted: the cache lookup does it.
        self.rate_check = rate_check

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
            scope = owner
        elif owner is None or owner == principal.subject:
            scope = principal.subject
        else:
            raise ForbiddenError("Only admins may list another owner's tasks")

        async def load(written_at: float) -> bytes:
            total, tasks = await self.connections.read(
                written_at,
                lambda connection: TaskRepository(connection).list(
                    owner=scope,
                    status=status.value if status else None,
                    offset=(page - 1) * page_size,
                    limit=page_size,
                ),
            )
            items = [TaskRead.model_validate(task) for task in tasks]
            result = TaskPage(total=total, page=page, page_size=page_size, items=items)
            return result.model_dump_json().encode()

        # The owner filter is part of the key, never of the scope: an admin's filtered
        # page lives in the admin view, which every write invalidates.
        key = f"list:{page}:{page_size}:{status or ''}:{len(owner or '')}:{owner or ''}"
        return await self.cache.get_or_load(_view(principal), key, load, rate_check=self.rate_check)

    async def get(self, principal: Principal, task_id: uuid.UUID) -> bytes:
        async def load(written_at: float) -> bytes:
            task = await self.connections.read(
                written_at,
                lambda connection: TaskRepository(connection).get(task_id, owner=_scope(principal)),
            )
            if task is None:
                raise NotFoundError(TASK_NOT_FOUND)
            return _json(task)

        return await self.cache.get_or_load(
            _view(principal), f"task:{task_id}", load, rate_check=self.rate_check
        )


class TaskService:
    """Changes. Each is one statement on an autocommit connection, so it commits on its own
    (with the outbox row of a new task in the same statement), and only then do its effects
    go out: the cache invalidated, the notification handed to Celery. Each answers with
    the stored task's JSON."""

    def __init__(self, connections: Connections, cache: ResponseCache, outbox: Outbox) -> None:
        self.connections = connections
        self.cache = cache
        self.outbox = outbox

    async def create(self, principal: Principal, data: TaskCreate) -> bytes:
        task_id = uuid.uuid4()
        notification = self.outbox.task_created(
            task_id=task_id,
            owner=principal.subject,
            email=principal.email,
            title=data.title,
            description=data.description,
            status=data.status.value,
        )
        values = {
            "id": task_id,
            "owner": principal.subject,
            "title": data.title,
            "description": data.description,
            "status": data.status.value,
        }
        async with self._changing(principal.subject), self.connections() as connection:
            task = await TaskRepository(connection).add(
                values,
                alongside=[(notification.insert, notification.parameters)] if notification else (),
            )
        await self._changed(task["owner"])
        if notification is not None:
            self.outbox.committed(notification)
        return _json(task)

    async def update(self, principal: Principal, task_id: uuid.UUID, data: TaskUpdate) -> bytes:
        async with self._changing(_scope(principal)), self.connections() as connection:
            task = await TaskRepository(connection).update(
                task_id, data.changes(), owner=_scope(principal)
            )
        if task is None:
            raise NotFoundError(TASK_NOT_FOUND)
        await self._changed(task["owner"])
        return _json(task)

    async def delete(self, principal: Principal, task_id: uuid.UUID) -> None:
        async with self._changing(_scope(principal)), self.connections() as connection:
            owner = await TaskRepository(connection).delete(task_id, owner=_scope(principal))
        if owner is None:
            raise NotFoundError(TASK_NOT_FOUND)
        await self._changed(owner)

    @contextlib.asynccontextmanager
    async def _changing(self, owner: str | None) -> AsyncIterator[None]:
        """Around a change's statement: one whose outcome is unknown may have committed, so
        what it may have changed (`owner`'s tasks; None: anyone's) is invalidated before its
        503 goes out."""
        try:
            yield
        except DatabaseUnavailableError as exc:
            if exc.detail == OUTCOME_UNKNOWN:
                if owner is None:
                    await self.cache.invalidate_all()
                else:
                    await self._changed(owner)
            raise

    async def _changed(self, owner: str) -> None:
        # A committed change to an owner's task shows in their view and in the admin view.
        await self.cache.invalidate(_owner_view(owner), ADMIN_VIEW)


# Both async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
async def get_task_reader(connections: ConnectionsDep, request: Request) -> TaskReader:
    return TaskReader(connections, request.app.state.cache, deferred_check(request))


async def get_task_service(connections: ConnectionsDep, request: Request) -> TaskService:
    state = request.app.state
    return TaskService(connections, state.cache, state.outbox)


TaskReaderDep = Annotated[TaskReader, Depends(get_task_reader)]
TaskServiceDep = Annotated[TaskService, Depends(get_task_service)]
