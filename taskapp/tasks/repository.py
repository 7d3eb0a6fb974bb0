"""Every query on `tasks`. Flushes, never commits: the request's session dependency does."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from taskapp.tasks.models import Task


def _match(task_id: uuid.UUID, owner: str | None) -> list[ColumnElement[bool]]:
    # With the owner known the planner prunes to a single partition.
    conditions = [Task.id == task_id]
    if owner is not None:
        conditions.append(Task.owner == owner)
    return conditions


class TaskRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, task: Task) -> Task:
        self.session.add(task)
        await self.session.flush()  # INSERT ... RETURNING fills id-side server defaults
        return task

    async def get(self, task_id: uuid.UUID, *, owner: str | None) -> Task | None:
        result = await self.session.execute(select(Task).where(*_match(task_id, owner)))
        return result.scalar_one_or_none()

    async def list(
        self, *, owner: str | None, status: str | None, offset: int, limit: int
    ) -> tuple[int, Sequence[Task]]:
        conditions = []
        if owner is not None:
            conditions.append(Task.owner == owner)
        if status is not None:
            conditions.append(Task.status == status)
        total = await self.session.scalar(select(func.count()).select_from(Task).where(*conditions))
        page = await self.session.scalars(
            select(Task)
            .where(*conditions)
            .order_by(Task.created_at.desc(), Task.id.desc())
            .offset(offset)
            .limit(limit)
        )
        return total or 0, page.all()

    async def update(
        self, task_id: uuid.UUID, changes: dict[str, Any], *, owner: str | None
    ) -> Task | None:
        result = await self.session.execute(
            update(Task)
            .where(*_match(task_id, owner))
            .values(**changes, updated_at=func.now())
            .returning(Task),
            execution_options={"synchronize_session": False},
        )
        return result.scalar_one_or_none()

    async def delete(self, task_id: uuid.UUID, *, owner: str | None) -> str | None:
        """Delete the task; its owner, or None when there was no such task."""
        result = await self.session.execute(
            delete(Task).where(*_match(task_id, owner)).returning(Task.owner),
            execution_options={"synchronize_session": False},
        )
        return result.scalar_one_or_none()
