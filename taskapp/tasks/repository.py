"""Every statement on `tasks`: on a read's connection, or in a change's unit of work.

Statements are Core constructs, built once with bound parameters and compiled once, run on
asyncpg directly (`taskapp.database.driver`); their rows feed JSON straight away.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, TypeAlias, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Insert,
    Integer,
    Select,
    String,
    Table,
    Update,
    Uuid,
    and_,
    bindparam,
    column,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import ARRAY, array
from sqlalchemy.sql.dml import ReturningDelete

from taskapp.database.driver import Record
from taskapp.database.unit_of_work import Executor
from taskapp.membership.models import Member
from taskapp.membership.repository import audience, inbox_inserts, projects_of
from taskapp.tasks.models import ALL_ASSIGNEES, Task, TaskAssignment, TaskCount

TaskRow: TypeAlias = Record
_TASKS = cast(Table, Task.__table__)
_MEMBERS = cast(Table, Member.__table__)
_COUNTS = cast(Table, TaskCount.__table__)
_ASSIGNMENTS = cast(Table, TaskAssignment.__table__)
_USERS = ARRAY(String(255))
# The bound parameter naming the caller whose projects a statement is confined to.
_VIEWER = "viewer"


# A caller's tasks are read from the partitions of at most this many tenants by name (the
# rest are pruned as the statement starts); with more, from every partition.
PRUNED_TENANTS = 32
# (tenant parameters, one project): see `Scope.shape`.
ScopeShape: TypeAlias = tuple[int, bool]


@dataclass(frozen=True, slots=True)
class Scope:
    """What a user may read: the projects they are a member of, each with its tenant."""

    projects: tuple[uuid.UUID, ...]
    tenants: tuple[str, ...]  # the owner of each project, in the same order

    @classmethod
    def of(cls, memberships: Sequence[Record]) -> Scope:
        return cls(
            tuple(row["project_id"] for row in memberships),
            tuple(row["owner"] for row in memberships),
        )

    @property
    def owners(self) -> tuple[str, ...]:
        """The tenants, each once."""
        return tuple(sorted(set(self.tenants)))

    def only(self, project: uuid.UUID) -> Scope | None:
        """The part of the scope that is `project`; None when it is not in it."""
        for candidate, tenant in zip(self.projects, self.tenants, strict=True):
            if candidate == project:
                return Scope((project,), (tenant,))
        return None

    def named(self) -> int:
        """How many tenant parameters a statement naming the owners has: a power of two (so
        that few statements are prepared), or 0 for every partition."""
        count = len(self.owners)
        return 0 if count > PRUNED_TENANTS else 1 << (count - 1).bit_length()

    def shape(self) -> ScopeShape:
        """What a statement over this scope depends on: its tenant parameters, and whether
        it is one project (most users': their Inbox), whose tasks one index scan reads in
        order, with no sort."""
        return self.named(), len(self.projects) == 1

    def parameters(self) -> dict[str, Any]:
        if len(self.projects) == 1:
            return {"tenant_0": self.tenants[0], "scope_project": self.projects[0]}
        values = self.tenant_parameters()
        values["scope_projects"] = list(self.projects)
        values["scope_tenants"] = list(self.tenants)
        values["scope_owners"] = list(self.owners)
        return values

    def tenant_parameters(self) -> dict[str, Any]:
        """The tenants alone, one parameter each (`named`); the spare slots repeat the last."""
        owners = self.owners
        slots = self.named()
        named = [*owners, *[owners[-1]] * (slots - len(owners))]
        return {f"tenant_{n}": owner for n, owner in enumerate(named[:slots])}


def _in_scope(shape: ScopeShape) -> list[ColumnElement[bool]]:
    """Tasks of the scope's projects, with their owners named one by one (`owner = $1 OR
    owner = $2`): PostgreSQL prunes the other partitions when it starts the plan, generic
    plans too. It prunes nothing for `owner = ANY($1)` with an array parameter, nor for
    `owner IN ($1, $2)`, which it reads as `owner = ANY(ARRAY[$1, $2]::text[])`."""
    if shape[1]:
        project: ColumnElement[bool] = _TASKS.c.project_id == bindparam("scope_project")
    else:
        project = _TASKS.c.project_id == func.any(bindparam("scope_projects", type_=ARRAY(Uuid)))
    return [project, *_named_tenants(shape)]


def _named_tenants(shape: ScopeShape | None) -> list[ColumnElement[bool]]:
    if shape is None or not shape[0]:
        return []
    if shape[1]:
        return [_TASKS.c.owner == bindparam("tenant_0", type_=String(255))]
    owners = [bindparam(f"tenant_{n}", type_=String(255)) for n in range(shape[0])]
    return [or_(*(_TASKS.c.owner == owner for owner in owners))]


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What a list is narrowed to; each None is no condition."""

    scope: Scope | None = None  # only tasks of these projects (None: every task)
    owner: str | None = None  # the tenant
    status: str | None = None
    project: uuid.UUID | None = None
    assignee: str | None = None  # a user, or NO_ASSIGNEE
    created_by: str | None = None

    def parameters(self) -> dict[str, Any]:
        values = {
            "owner": self.owner,
            "status": self.status,
            "project": self.project,
            "assignee": None if self.assignee == NO_ASSIGNEE else self.assignee,
            "created_by": self.created_by,
        }
        found = {name: value for name, value in values.items() if value is not None}
        if self.scope is not None:
            found.update(self.scope.parameters())
        return found

    def shape(self) -> tuple[ScopeShape | None, bool, bool, bool, str | None, bool]:
        """What the statement depends on: its conditions, not their values."""
        assignee = None
        if self.assignee is not None:
            assignee = "none" if self.assignee == NO_ASSIGNEE else "user"
        return (
            None if self.scope is None else self.scope.shape(),
            self.owner is not None,
            self.status is not None,
            self.project is not None,
            assignee,
            self.created_by is not None,
        )


NO_ASSIGNEE = ""  # TaskFilter.assignee: tasks nobody is assigned to


def _member_of(*, editing: bool) -> list[ColumnElement[bool]]:
    """Tasks of the projects the viewer is a member of (may edit), read from the members as
    the statement runs: for a change by id, one statement that cannot be refused wrongly
    by a membership read before it. (Owners read by a subquery prune nothing: a change
    names the owners it guesses as parameters, `TaskRepository.update`.)"""
    return [_TASKS.c.project_id.in_(projects_of(_VIEWER, editing=editing))]


def _read_conditions(
    scope: ScopeShape | None,
    owner: bool,
    status: bool,
    project: bool,
    assignee: str | None,
    created_by: bool,
) -> list[ColumnElement[bool]]:
    conditions = [] if scope is None else _in_scope(scope)
    if owner:
        conditions.append(_TASKS.c.owner == bindparam("owner"))
    if status:
        conditions.append(_TASKS.c.status == bindparam("status"))
    if project:
        conditions.append(_TASKS.c.project_id == bindparam("project"))
    if assignee == "user":
        member = bindparam("assignee", type_=String(255))
        conditions.append(_TASKS.c.assignees.contains(array([member])))
    elif assignee == "none":
        conditions.append(func.cardinality(_TASKS.c.assignees) == 0)
    if created_by:
        conditions.append(_TASKS.c.created_by == bindparam("created_by"))
    return conditions


def _identity(task_id: uuid.UUID, viewer: str | None) -> dict[str, Any]:
    """The bound values of a change by id, confined to `viewer`'s projects unless None."""
    parameters: dict[str, Any] = {"match_id": task_id}
    if viewer is not None:
        parameters[_VIEWER] = viewer
    return parameters


def _outer_conditions(scope: ScopeShape | None, *, owner: bool) -> list[ColumnElement[bool]]:
    """The tenant conditions alone: what prunes the scan that reads a page's rows."""
    conditions = _named_tenants(scope)
    if owner:
        conditions.append(_TASKS.c.owner == bindparam("owner"))
    return conditions


def _by_id() -> ColumnElement[bool]:
    # Bound as match_*: an UPDATE may not bind a parameter under a column's own name.
    return _TASKS.c.id == bindparam("match_id")


@cache
def _get_statement(scope: ScopeShape | None) -> Select[Any]:
    """The task by id, within the scope. For one project, by its primary key (owner, id),
    the project checked on the row: a generic plan given `project_id = $2` too may read the
    task through the (owner, project_id, created_at, id) index instead, walking every entry
    of the project (1 ms for an Inbox of 20,000 tasks)."""
    if scope is not None and scope[1]:
        return select(_TASKS).where(_by_id(), *_named_tenants(scope))
    conditions = [] if scope is None else _in_scope(scope)
    return select(_TASKS).where(_by_id(), *conditions)


@cache
def _locking_get_statement(*, viewer: bool) -> Select[Any]:
    """The task with the caller's role in its project and its project's members, locked
    until the change commits."""
    role = (
        select(_MEMBERS.c.role)
        .where(_MEMBERS.c.project_id == _TASKS.c.project_id)
        .where(_MEMBERS.c.user_id == bindparam("caller"))
        .scalar_subquery()
        .label("role")
    )
    return (
        select(_TASKS, role, audience(_TASKS.c.project_id))
        .where(_by_id(), *(_member_of(editing=False) if viewer else ()))
        .with_for_update(of=_TASKS)
    )


@cache
def _list_statement(
    scope: ScopeShape | None,
    owner: bool,
    status: bool,
    project: bool,
    assignee: str | None,
    created_by: bool,
) -> Select[Any]:
    """One round trip for a page: the matching count, left-joined to the page's rows, so
    there is one row (with NULL task columns) even when the page is empty. Serves admins'
    lists, one project's, and the rare combinations `_assigned` and `_merged` leave."""
    conditions = _read_conditions(scope, owner, status, project, assignee, created_by)
    newest_first = (_TASKS.c.created_at.desc(), _TASKS.c.id.desc())
    if scope is not None and scope[1] and _kept_count(owner, project, assignee, created_by):
        # One project's total: read from its counts.
        tenant = bindparam("tenant_0", type_=String(255))
        counts = _counted(tenant, bindparam("scope_project"), status, assignee)
        total = select(_sum_of_counts().label("total")).where(*counts)
    else:
        total = select(func.count().label("total")).select_from(_TASKS).where(*conditions)
    # Deferred join: the offset is walked in the index alone (an index-only scan of the
    # sort keys), and only the page's own rows are read from the table. Skipping rows of a
    # plain `SELECT * ... OFFSET n` fetches every skipped row, so deep pages cost far more.
    # Across all owners the page bounds are written into the SQL: the engine runs generic
    # plans, and one made without knowing LIMIT reads the whole table into a hash join.
    # Within the owners of one caller the generic plan is the right one.
    bounds = not owner and scope is None
    keys = (
        select(_TASKS.c.owner, _TASKS.c.id)
        .where(*conditions)
        .order_by(*newest_first)
        .offset(bindparam("offset", type_=Integer, literal_execute=bounds))
        .limit(bindparam("limit", type_=Integer, literal_execute=bounds))
        .subquery("page_keys")
    )
    page = (
        select(_TASKS)
        .join(keys, and_(_TASKS.c.owner == keys.c.owner, _TASKS.c.id == keys.c.id))
        .where(*_outer_conditions(scope, owner=owner))  # prunes the outer scan too
        .subquery("page")
    )
    counted = total.subquery("counted")
    return (
        select(counted.c.total, page)
        .select_from(counted.outerjoin(page, true()))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


def _kept_count(owner: bool, project: bool, assignee: str | None, created_by: bool) -> bool:
    """Whether a scoped list's total is in `task_counts`: its projects' tasks, or one
    assignee's, all or in one status."""
    return not (owner or project or created_by or assignee == "none")


def _counted(
    tenant: ColumnElement[Any], project: ColumnElement[Any], status: bool, assignee: str | None
) -> list[ColumnElement[bool]]:
    """The rows of `task_counts` that add up to a scoped list's total (see `_kept_count`)."""
    counted = [
        _COUNTS.c.owner == tenant,
        _COUNTS.c.project_id == project,
        _COUNTS.c.assignee
        == (
            bindparam("assignee", type_=String(255))
            if assignee == "user"
            else literal(ALL_ASSIGNEES, String(255))
        ),
    ]
    if status:
        counted.append(_COUNTS.c.status == bindparam("status"))
    return counted


def _sum_of_counts() -> ColumnElement[int]:
    return sql_cast(func.coalesce(func.sum(_COUNTS.c.tasks), 0), BigInteger)


def _scope_rows() -> Any:
    """The scope's projects as rows (project_id, tenant)."""
    return (
        func.unnest(
            bindparam("scope_projects", type_=ARRAY(Uuid)),
            bindparam("scope_tenants", type_=_USERS),
        )
        .table_valued(column("project_id", Uuid), column("tenant", String(255)))
        .render_derived("scope")
    )


def _assigned(shape: tuple[Any, ...]) -> bool:
    """Whether a list over several projects is of one assignee's tasks (by status or all),
    read from `task_assignments` (see `_assigned_list_statement`)."""
    scope, owner, _, project, assignee, created_by = shape
    multiple = scope is not None and not scope[1]
    return multiple and assignee == "user" and not (owner or project or created_by)


@cache
def _assigned_list_statement(status: bool) -> Select[Any]:
    """A page of the tasks assigned to someone in the scope's projects: per tenant, the
    newest `offset + limit` of their assignments, read in order from the (owner, user_id,
    created_at, task_id) index of `task_assignments`, merged into the page; the total added
    up from the assignee's counts in each project. The cost is the page's and the projects',
    not the assignments'."""
    tenants = (
        func.unnest(bindparam("scope_owners", type_=_USERS))
        .table_valued(column("tenant", String(255)))
        .render_derived("tenants")
    )
    assignments = _ASSIGNMENTS.c
    conditions = [
        assignments.owner == tenants.c.tenant,
        assignments.user_id == bindparam("assignee", type_=String(255)),
        assignments.project_id == func.any(bindparam("scope_projects", type_=ARRAY(Uuid))),
    ]
    if status:
        conditions.append(assignments.status == bindparam("status"))
    scope = _scope_rows()
    total = select(_sum_of_counts().label("total")).select_from(
        scope.join(_COUNTS, and_(*_counted(scope.c.tenant, scope.c.project_id, status, "user")))
    )
    keys = _merged_keys(
        tenants, conditions, assignments.owner, assignments.task_id, assignments.created_at
    )
    return _page_of(total, keys)


def _merged_keys(
    outer: Any,
    conditions: list[ColumnElement[bool]],
    owner: ColumnElement[Any],
    key: ColumnElement[Any],
    created_at: ColumnElement[Any],
) -> Any:
    """The page's keys (owner, id): for each row of `outer`, the newest `offset + limit`
    keys matching `conditions` (a lateral scan in index order), merged newest first."""
    depth = bindparam("offset", type_=Integer) + bindparam("limit", type_=Integer)
    newest = (
        select(owner.label("owner"), key.label("id"), created_at.label("created_at"))
        .where(*conditions)
        .order_by(created_at.desc(), key.desc())
        .limit(depth)
        .lateral("newest")
    )
    return (
        select(newest.c.owner, newest.c.id)
        .select_from(outer.join(newest, true()))
        .order_by(newest.c.created_at.desc(), newest.c.id.desc())
        .offset(bindparam("offset", type_=Integer))
        .limit(bindparam("limit", type_=Integer))
        .subquery("page_keys")
    )


def _page_of(total: Select[Any], keys: Any) -> Select[Any]:
    """The total, left-joined to the rows of the page's keys (one row with NULL task
    columns when the page is empty), newest first. Each row is read by its key from its
    tenant's partition alone: the lateral `LIMIT 1` (a key is one task) keeps the planner
    from joining the keys to a scan of every partition instead."""
    row = (
        select(_TASKS)
        .where(_TASKS.c.owner == keys.c.owner, _TASKS.c.id == keys.c.id)
        .limit(1)
        .lateral("row")
    )
    page = select(row).select_from(keys.join(row, true())).subquery("page")
    totals = total.subquery("totals")
    return (
        select(totals.c.total, page)
        .select_from(totals.outerjoin(page, true()))
        .order_by(page.c.created_at.desc(), page.c.id.desc())
    )


def _merged(shape: tuple[Any, ...]) -> bool:
    """Whether a list over several projects is read project by project and merged (see
    `_merged_list_statement`): any filter but one assignee, whose tasks are merged per
    tenant from `task_assignments` instead (`_assigned`), or, with an owner or a creator
    too, found by the GIN index of assignees (`_list_statement`)."""
    scope, _, _, project, assignee, _ = shape
    return scope is not None and not scope[1] and not project and assignee != "user"


@cache
def _merged_list_statement(
    owner: bool, status: bool, assignee: str | None, created_by: bool
) -> Select[Any]:
    """A page over several projects: each project's newest `offset + limit` keys, read in
    order from its tenant's partition by the (owner, project_id, created_at, id) index, merged
    into the page; the count is each project's, added up. Each project's scan is pruned to
    one partition as it runs (the tenant is a parameter of the nested loop), so the cost is
    the page's and the projects', not the tasks' the caller can see."""
    scope = _scope_rows()
    conditions = [
        _TASKS.c.owner == scope.c.tenant,
        _TASKS.c.project_id == scope.c.project_id,
        *_read_conditions(None, owner, status, False, assignee, created_by),
    ]
    if _kept_count(owner, False, assignee, created_by):
        counts = _counted(scope.c.tenant, scope.c.project_id, status, assignee)
        total = select(_sum_of_counts().label("total")).select_from(
            scope.join(_COUNTS, and_(*counts))
        )
    else:
        counted = select(func.count().label("tasks")).where(*conditions).lateral("counted")
        total = select(
            sql_cast(func.coalesce(func.sum(counted.c.tasks), 0), BigInteger).label("total")
        ).select_from(scope.join(counted, true()))
    keys = _merged_keys(scope, conditions, _TASKS.c.owner, _TASKS.c.id, _TASKS.c.created_at)
    return _page_of(total, keys)


# Writes are built once too, per set of columns; the values a write sets are bound under
# this prefix.
_NEW = "new_"


@lru_cache(maxsize=64)
def _insert_statement(columns: frozenset[str], *, inbox: bool) -> Insert:
    """`inbox`: the task goes to its creator's Inbox, made on the way if it is not there."""
    statement = (
        insert(_TASKS)
        .values({name: bindparam(f"{_NEW}{name}") for name in sorted(columns)})
        .returning(_TASKS)
    )
    if inbox:
        for cte in inbox_inserts():
            statement = statement.add_cte(cte)
    return statement


@lru_cache(maxsize=256)
def _update_statement(columns: frozenset[str], *, viewer: bool, tenants: int) -> Update:
    """A change by id, confined to the projects the viewer may edit, and to `tenants` named
    owners when not 0 (the other partitions pruned as the statement starts: without them it
    starts and probes all eight); the members of the task's project come back with it (whose
    cached views it touches)."""
    values: dict[str, Any] = {name: bindparam(f"{_NEW}{name}") for name in sorted(columns)}
    return (
        update(_TASKS)
        .where(
            _by_id(),
            *(_member_of(editing=True) if viewer else ()),
            *_named_tenants((tenants, False)),
        )
        .values({**values, "updated_at": func.now()})
        .returning(_TASKS, audience(_TASKS.c.project_id))
    )


@lru_cache(maxsize=64)
def _update_row_statement(columns: frozenset[str]) -> Update:
    """A change of a task by its primary key: its tenant may change (the row moves)."""
    values: dict[str, Any] = {name: bindparam(f"{_NEW}{name}") for name in sorted(columns)}
    return (
        update(_TASKS)
        .where(_TASKS.c.owner == bindparam("match_owner"), _TASKS.c.id == bindparam("match_id"))
        .values({**values, "updated_at": func.now()})
        .returning(_TASKS)
    )


@cache
def _delete_statement() -> ReturningDelete[Any]:
    return delete(_TASKS).where(_by_id()).returning(_TASKS.c.owner, audience(_TASKS.c.project_id))


def _in_project() -> list[ColumnElement[bool]]:
    return [
        _TASKS.c.owner == bindparam("match_owner"),
        _TASKS.c.project_id == bindparam("match_project"),
    ]


@cache
def _end_assignments_statement() -> Update:
    user = bindparam("user", type_=String(255))
    return (
        update(_TASKS)
        .where(*_in_project(), _TASKS.c.assignees.contains(array([user])))
        .values(assignees=func.array_remove(_TASKS.c.assignees, user), updated_at=func.now())
    )


@cache
def _move_tenant_statement() -> Update:
    return update(_TASKS).where(*_in_project()).values(owner=bindparam("new_owner"))


@cache
def _delete_project_statement() -> Any:
    return delete(_TASKS).where(*_in_project())


@cache
def _forget_counts_statement() -> Any:
    """The counts of a project under a tenant that no longer has its tasks (all zero)."""
    return delete(_COUNTS).where(
        _COUNTS.c.owner == bindparam("match_owner"),
        _COUNTS.c.project_id == bindparam("match_project"),
    )


class TaskRepository:
    """On a read's connection or a change's unit of work: each method is one statement."""

    def __init__(self, connection: Executor) -> None:
        self.connection = connection

    async def add(self, values: Mapping[str, Any], *, inbox: Mapping[str, Any] | None) -> TaskRow:
        """Insert a task; the stored row, server defaults (timestamps) included. `inbox`:
        the bound values of the creator's Inbox (`inbox_parameters`), when it goes there."""
        statement = _insert_statement(frozenset(values), inbox=inbox is not None)
        parameters = {f"{_NEW}{name}": value for name, value in values.items()}
        if inbox is not None:
            parameters.update(inbox)
        (row,) = await self.connection.fetch(statement, parameters)
        return row

    async def get(self, task_id: uuid.UUID, *, scope: Scope | None) -> TaskRow | None:
        """The task, if it is in `scope` (None: anywhere)."""
        parameters: dict[str, Any] = {"match_id": task_id}
        if scope is not None:
            if not scope.projects:
                return None
            parameters.update(scope.parameters())
        statement = _get_statement(None if scope is None else scope.shape())
        row = _one_or_none(await self.connection.fetch(statement, parameters))
        if row is not None and scope is not None and row["project_id"] not in scope.projects:
            return None  # another project of the same tenant
        return row

    async def get_for_update(
        self, task_id: uuid.UUID, *, caller: str, viewer: str | None
    ) -> TaskRow | None:
        """The task locked, with `role` (the caller's in its project, or None) and
        `audience` (its project's members)."""
        parameters = {**_identity(task_id, viewer), "caller": caller}
        statement = _locking_get_statement(viewer=viewer is not None)
        return _one_or_none(await self.connection.fetch(statement, parameters))

    async def list(
        self, where: TaskFilter, *, offset: int, limit: int
    ) -> tuple[int, list[TaskRow]]:
        if where.scope is not None and not where.scope.projects:
            return 0, []
        parameters: dict[str, Any] = {"offset": offset, "limit": limit, **where.parameters()}
        shape = where.shape()
        if _assigned(shape):
            statement = _assigned_list_statement(where.status is not None)
        elif _merged(shape):
            _, owner, status, _, assignee, created_by = shape
            statement = _merged_list_statement(owner, status, assignee, created_by)
        else:
            statement = _list_statement(*shape)
        rows = await self.connection.fetch(statement, parameters)
        return rows[0]["total"], [row for row in rows if row["id"] is not None]

    async def update(
        self,
        task_id: uuid.UUID,
        changes: Mapping[str, Any],
        *,
        viewer: str | None,
        within: Scope | None = None,
    ) -> TaskRow | None:
        """Change the task if `viewer` (None: anyone) may edit it; with `audience`. `within`:
        look for it only among the tenants of this scope (a guess, perhaps stale: a task
        outside them is not found)."""
        parameters = _identity(task_id, viewer)
        parameters.update((f"{_NEW}{name}", value) for name, value in changes.items())
        tenants = within.named() if within is not None and within.projects else 0
        if tenants:
            assert within is not None
            parameters.update(within.tenant_parameters())
        statement = _update_statement(
            frozenset(changes), viewer=viewer is not None, tenants=tenants
        )
        return _one_or_none(await self.connection.fetch(statement, parameters))

    async def update_row(
        self, owner: str, task_id: uuid.UUID, changes: Mapping[str, Any]
    ) -> TaskRow:
        """Change the task whose primary key is (`owner`, `task_id`), found and locked in
        this unit of work; `changes` may move it to another tenant."""
        parameters: dict[str, Any] = {"match_owner": owner, "match_id": task_id}
        parameters.update((f"{_NEW}{name}", value) for name, value in changes.items())
        (row,) = await self.connection.fetch(_update_row_statement(frozenset(changes)), parameters)
        return row

    async def delete(self, task_id: uuid.UUID) -> TaskRow | None:
        """Delete the task; its `owner` and `audience`, or None when there was no such task."""
        rows = await self.connection.fetch(_delete_statement(), {"match_id": task_id})
        return _one_or_none(rows)

    async def end_assignments(self, owner: str, project_id: uuid.UUID, user: str) -> None:
        """`user` is no longer assigned to any task of the project."""
        parameters = {"match_owner": owner, "match_project": project_id, "user": user}
        await self.connection.fetch(_end_assignments_statement(), parameters)

    async def move_tenant(self, owner: str, project_id: uuid.UUID, new_owner: str) -> None:
        """Every task of the project to the partition of its new owner."""
        parameters = {"match_owner": owner, "match_project": project_id, "new_owner": new_owner}
        await self.connection.fetch(_move_tenant_statement(), parameters)
        await self.connection.fetch(_forget_counts_statement(), parameters)

    async def delete_project(self, owner: str, project_id: uuid.UUID) -> None:
        """Every task of the project."""
        parameters = {"match_owner": owner, "match_project": project_id}
        await self.connection.fetch(_delete_project_statement(), parameters)
        await self.connection.fetch(_forget_counts_statement(), parameters)


def _one_or_none(rows: list[TaskRow]) -> TaskRow | None:
    """The row of a statement on one task (by its primary key or its unique id)."""
    if len(rows) > 1:
        raise RuntimeError(f"{len(rows)} rows for one task")
    return rows[0] if rows else None
