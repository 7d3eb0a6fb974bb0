"""Every statement on `tasks`: on a read's connection, or in a change's unit of work.

Statements are Core constructs, built once with bound parameters and compiled once, run on
asyncpg directly (`taskapp.database.driver`); their rows feed JSON straight away.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import cache, lru_cache
from typing import Any, TypeAlias, cast

from sqlalchemy import (
    ColumnElement,
    Insert,
    Integer,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    delete,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.sql.dml import ReturningDelete

from taskapp.database.driver import Record
from taskapp.database.unit_of_work import Executor
from taskapp.tasks.models import Task

TaskRow: TypeAlias = Record
_TASKS = cast(Table, Task.__table__)


def _read_conditions(*, owner: bool, status: bool) -> list[ColumnElement[bool]]:
    # With the owner known the planner prunes to a single partition.
    conditions = []
    if owner:
        conditions.append(_TASKS.c.owner == bindparam("owner"))
    if status:
        conditions.append(_TASKS.c.status == bindparam("status"))
    return conditions


def _one_task(*, owner: bool) -> list[ColumnElement[bool]]:
    # Bound as match_*: an UPDATE may not bind a parameter under a column's own name.
    conditions = [_TASKS.c.id == bindparam("match_id")]
    if owner:  # with the owner known the planner prunes to a single partition
        conditions.append(_TASKS.c.owner == bindparam("match_owner"))
    return conditions


def _identity(task_id: uuid.UUID, owner: str | None) -> dict[str, Any]:
    """The bound values of `_one_task`."""
    parameters: dict[str, Any] = {"match_id": task_id}
    if owner is not None:
        parameters["match_owner"] = owner
    return parameters


@cache
def _get_statement(*, owner: bool) -> Select[Any]:
    return select(_TASKS).where(*_one_task(owner=owner))


@cache
def _list_statement(*, owner: bool, status: bool) -> Select[Any]:
    """One round trip for a page: the matching count, left-joined to the page's rows, so
    there is one row (with NULL task columns) even when the page is empty."""
    conditions = _read_conditions(owner=owner, status=status)
    newest_first = (_TASKS.c.created_at.desc(), _TASKS.c.id.desc())
    total = select(func.count().label("total")).select_from(_TASKS).where(*conditions)
    # Deferred join: the offset is walked in the index alone (an index-only scan of the
    # sort keys), and only the page's own rows are read from the table. Skipping rows of a
    # plain `SELECT * ... OFFSET n` fetches every skipped row, so deep pages cost far more.
    # Across all owners the page bounds are written into the SQL: the engine runs generic
    # plans, and one made without knowing LIMIT reads the whole table into a hash join.
    # Within one owner the generic plan is the right one.
    literal = not owner
    keys = (
        select(_TASKS.c.owner, _TASKS.c.id)
        .where(*conditions)
        .order_by(*newest_first)
        .offset(bindparam("offset", type_=Integer, literal_execute=literal))
        .limit(bindparam("limit", type_=Integer, literal_execute=literal))
        .subquery("page_keys")
    )
    page = (
        select(_TASKS)
        .join(keys, and_(_TASKS.c.owner == keys.c.owner, _TASKS.c.id == keys.c.id))
        .where(*_read_conditions(owner=owner, status=False))  # prunes the outer scan too
        .subquery("page")
    )
    counted = total.subquery("counted")
    return (
        select(counted.c.total, page)
        .select_from(counted.outerjoin(page, true()))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


# Writes are built once too, per set of columns; the values a write sets are bound under
# this prefix.
_NEW = "new_"


@lru_cache(maxsize=64)
def _insert_statement(columns: frozenset[str]) -> Insert:
    return (
        insert(_TASKS)
        .values({name: bindparam(f"{_NEW}{name}") for name in sorted(columns)})
        .returning(_TASKS)
    )


@lru_cache(maxsize=64)
def _update_statement(columns: frozenset[str], *, owner: bool) -> Update:
    values: dict[str, Any] = {name: bindparam(f"{_NEW}{name}") for name in sorted(columns)}
    return (
        update(_TASKS)
        .where(*_one_task(owner=owner))
        .values({**values, "updated_at": func.now()})
        .returning(_TASKS)
    )


@cache
def _delete_statement(*, owner: bool) -> ReturningDelete[Any]:
    return delete(_TASKS).where(*_one_task(owner=owner)).returning(_TASKS.c.owner)


class TaskRepository:
    """On a read's connection or a change's unit of work: each method is one statement."""

    def __init__(self, connection: Executor) -> None:
        self.connection = connection

    async def add(self, values: Mapping[str, Any]) -> TaskRow:
        """Insert a task; the stored row, server defaults (timestamps) included."""
        statement = _insert_statement(frozenset(values))
        parameters = {f"{_NEW}{name}": value for name, value in values.items()}
        (row,) = await self.connection.fetch(statement, parameters)
        return row

    async def get(self, task_id: uuid.UUID, *, owner: str | None) -> TaskRow | None:
        statement = _get_statement(owner=owner is not None)
        return _one_or_none(await self.connection.fetch(statement, _identity(task_id, owner)))

    async def list(
        self, *, owner: str | None, status: str | None, offset: int, limit: int
    ) -> tuple[int, list[TaskRow]]:
        parameters: dict[str, Any] = {"offset": offset, "limit": limit}
        if owner is not None:
            parameters["owner"] = owner
        if status is not None:
            parameters["status"] = status
        statement = _list_statement(owner=owner is not None, status=status is not None)
        rows = await self.connection.fetch(statement, parameters)
        return rows[0]["total"], [row for row in rows if row["id"] is not None]

    async def update(
        self, task_id: uuid.UUID, changes: Mapping[str, Any], *, owner: str | None
    ) -> TaskRow | None:
        parameters = _identity(task_id, owner)
        parameters.update((f"{_NEW}{name}", value) for name, value in changes.items())
        statement = _update_statement(frozenset(changes), owner=owner is not None)
        return _one_or_none(await self.connection.fetch(statement, parameters))

    async def delete(self, task_id: uuid.UUID, *, owner: str | None) -> str | None:
        """Delete the task; its owner, or None when there was no such task."""
        statement = _delete_statement(owner=owner is not None)
        row = _one_or_none(await self.connection.fetch(statement, _identity(task_id, owner)))
        return None if row is None else str(row["owner"])


def _one_or_none(rows: list[TaskRow]) -> TaskRow | None:
    """The row of a statement on one task (by its primary key or its unique id)."""
    if len(rows) > 1:
        raise RuntimeError(f"{len(rows)} rows for one task")
    return rows[0] if rows else None
