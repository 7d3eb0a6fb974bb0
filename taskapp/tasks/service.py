"""Task rules: who may see and change which task, which views a change makes stale, and the
events it records."""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Annotated, Any, NoReturn

from fastapi import Depends, Request

from taskapp.auth.principal import Principal
from taskapp.database.connections import Database
from taskapp.database.driver import Record
from taskapp.database.unit_of_work import UnitOfWork
from taskapp.dependencies import request_cache, request_database
from taskapp.errors import ForbiddenError
from taskapp.events.consumers.email import TASK_ASSIGNED, TASK_CREATED
from taskapp.events.event import NewEvent
from taskapp.membership.access import allowed, holds
from taskapp.membership.errors import ProjectArchivedError, ProjectNotFoundError, not_members
from taskapp.membership.models import ProjectRole, inbox_id
from taskapp.membership.repository import MembershipRepository, inbox_parameters
from taskapp.redis.cache import RequestCache
from taskapp.tasks.errors import TaskNotFoundError
from taskapp.tasks.models import TaskStatus
from taskapp.tasks.repository import NO_ASSIGNEE, Scope, TaskFilter, TaskRepository
from taskapp.tasks.schemas import TaskCreate, TaskUpdate, page_json, task_json
from taskapp.tasks.views import view_of, views_changed
from taskapp.users.repository import UserRepository
from taskapp.users.service import remember_caller

ME = "me"
NONE = "none"
_AT: tuple[str | int, ...] = ("body", "assignees")  # where assignees are in the input


def _viewer(principal: Principal) -> str | None:
    """The user whose projects a caller is confined to; None for an admin, who sees every
    task."""
    return None if principal.is_admin else principal.subject


class TaskReader:
    """Reads, answered with serialized JSON so a cache hit skips the database and the models.

    A connection is taken only to load a missed entry, and given back as soon as it is loaded;
    it is the read replica's when that has replayed the last write to the caller's view.
    """

    def __init__(
        self,
        database: Database,
        cache: RequestCache,
        remember: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`remember`: puts the caller in the users directory, before a load (a read the
        cache answers needs no database, and its caller was remembered when it was
        loaded)."""
        self.database = database
        self.cache = cache
        self.remember = remember

    async def list(
        self,
        principal: Principal,
        *,
        page: int,
        page_size: int,
        owner: str | None = None,
        status: TaskStatus | None = None,
        project: uuid.UUID | None = None,
        assignee: str | None = None,
        created_by: str | None = None,
    ) -> bytes:
        if not principal.is_admin and owner is not None and owner != principal.subject:
            raise ForbiddenError("Only admins may list another owner's tasks")
        if created_by == ME:
            created_by = principal.subject

        async def load(written_at: float, version: str | None) -> bytes:
            if self.remember is not None:
                await self.remember()

            async def query(connection: Any) -> tuple[int, list[Record]]:
                scope = await self._scope(connection, principal, version)
                narrowed = project
                if project is not None and scope is not None:
                    # One project: one ordered index scan of its tenant's partition.
                    scope, narrowed = scope.only(project), None
                    if scope is None:
                        raise ProjectNotFoundError()
                where = TaskFilter(
                    scope=scope,
                    owner=owner,
                    status=status.value if status else None,
                    project=narrowed,
                    assignee=await _assignee(connection, principal, assignee),
                    created_by=created_by,
                )
                return await TaskRepository(connection).list(
                    where, offset=(page - 1) * page_size, limit=page_size
                )

            total, tasks = await self.database.read(written_at, query)
            return page_json(total, page, page_size, tasks)

        # Every filter is part of the key, never of the view: an admin's filtered page lives
        # in the admin view, which every write makes stale. The texts a caller chooses are
        # length-prefixed, so no two sets of filters make one key.
        key = f"list:{page}:{page_size}:{status or ''}:{project or ''}"
        for text in (owner, assignee, created_by):
            key += f":{len(text)}:{text}" if text is not None else ":"
        return await self.cache.get_or_load(view_of(principal), key, load)

    async def get(self, principal: Principal, task_id: uuid.UUID) -> bytes:
        async def load(written_at: float, version: str | None) -> bytes:
            if self.remember is not None:
                await self.remember()

            async def query(connection: Any) -> Record | None:
                scope = await self._scope(connection, principal, version)
                return await TaskRepository(connection).get(task_id, scope=scope)

            task = await self.database.read(written_at, query)
            if task is None:
                raise TaskNotFoundError()
            return task_json(task)

        return await self.cache.get_or_load(view_of(principal), f"task:{task_id}", load)

    async def _scope(
        self, connection: Any, principal: Principal, version: str | None
    ) -> Scope | None:
        """What the caller may read; kept in this process for the version of their view the
        lookup saw: every change of their memberships touches their view."""
        if principal.is_admin:
            return None
        view = view_of(principal)
        scope: Scope | None = self.cache.local(view, version, "scope")
        if scope is None:
            scope = await _scope(connection, principal)
            self.cache.keep_local(view, version, "scope", scope)
        return scope


async def _scope(connection: Any, principal: Principal) -> Scope | None:
    """What the caller may read: the projects they are a member of (None: everything)."""
    if principal.is_admin:
        return None
    return Scope.of(await MembershipRepository(connection).memberships(principal.subject))


async def _get(connection: Any, principal: Principal, task_id: uuid.UUID) -> Record | None:
    scope = await _scope(connection, principal)
    return await TaskRepository(connection).get(task_id, scope=scope)


async def _assignee(connection: Any, principal: Principal, assignee: str | None) -> str | None:
    """The `assignee` filter as a subject (`me`, `none`, or a user's subject, username or
    e-mail address); a name nobody has matches no task."""
    if assignee is None:
        return None
    if assignee == ME:
        return principal.subject
    if assignee == NONE:
        return NO_ASSIGNEE
    found = await UserRepository(connection).resolve(assignee)
    return found[0] if len(found) == 1 else assignee


class TaskService:
    """Changes. Each commits its statements with the events it records; only then are the
    views it touched forgotten and its events handed on. Each answers with the stored task's
    JSON. A change that is one statement (most of them) runs as one, with its events inside
    it; a change by id that its first statement did not find (see `update`) tries a second."""

    def __init__(self, database: Database, cache: RequestCache | None = None) -> None:
        """`cache`: where this process keeps what it last read of a caller's projects (a
        reader's `_scope`), which tells a change by id where to look first."""
        self.database = database
        self.cache = cache

    async def create(self, principal: Principal, data: TaskCreate) -> bytes:
        if data.project_id is None or data.project_id == inbox_id(principal.subject):
            return await self._create_in_inbox(principal, data)
        project_id = data.project_id
        async with self.database.unit_of_work() as work:
            project = await _editable_project(work, principal, project_id)
            assignees = await _members(work, project_id, data.assignees)
            task_id = uuid.uuid4()
            work.emit(_created(principal, task_id, project["owner"], data))
            for event in _assigned(principal, task_id, project, data.title, assignees):
                work.emit(event)
            task = await TaskRepository(work).add(
                {
                    **_new_task(principal, task_id, data),
                    "owner": project["owner"],
                    "project_id": project_id,
                },
                inbox=None,
            )
            work.touches(*views_changed(project["audience"]))
        return task_json(task)

    async def _create_in_inbox(self, principal: Principal, data: TaskCreate) -> bytes:
        """One statement: the Inbox (made if missing), the task and its events. Its only
        member is its owner."""
        me = principal.subject
        strangers = [((*_AT, n), user) for n, user in enumerate(data.assignees) if user != me]
        if strangers:
            raise not_members(*strangers)
        task_id = uuid.uuid4()
        async with self.database.unit_of_work(single_statement=True) as work:
            work.touches(*views_changed((me,)))
            work.emit(_created(principal, task_id, me, data))
            task = await TaskRepository(work).add(
                {**_new_task(principal, task_id, data), "owner": me, "project_id": inbox_id(me)},
                inbox=inbox_parameters(me),
            )
        return task_json(task)

    async def update(self, principal: Principal, task_id: uuid.UUID, data: TaskUpdate) -> bytes:
        changes = data.changes()
        if "project_id" in changes or "assignees" in changes:
            return await self._reassign(principal, task_id, data, changes)
        viewer = _viewer(principal)
        guess = self._last_scope(principal)
        task = await self._update(task_id, changes, viewer, guess)
        if task is None and guess is not None:
            # Not among the tenants last seen: in a project joined since, or not the
            # caller's to change. Everywhere, then.
            task = await self._update(task_id, changes, viewer, None)
            if task is not None and self.cache is not None:
                # The guess is stale: no more of it until a read keeps their projects again.
                self.cache.forget_local(view_of(principal), "scope")
        if task is None:
            await self._refused(principal, task_id)
        return task_json(task)

    async def _update(
        self,
        task_id: uuid.UUID,
        changes: Mapping[str, Any],
        viewer: str | None,
        within: Scope | None,
    ) -> Record | None:
        async with self.database.unit_of_work(single_statement=True) as work:
            task = await TaskRepository(work).update(task_id, changes, viewer=viewer, within=within)
            if task is not None:
                work.touches(*views_changed(task["audience"]))
        return task

    def _last_scope(self, principal: Principal) -> Scope | None:
        """The caller's projects as this process last read them (perhaps stale), when it
        has and a statement can name their tenants; None for an admin."""
        if self.cache is None or principal.is_admin:
            return None
        scope: Scope | None = self.cache.last_local(view_of(principal), "scope")
        return scope if scope is not None and scope.projects and scope.named() else None

    async def _refused(self, principal: Principal, task_id: uuid.UUID) -> NoReturn:
        """Why a change found no task: 403 when the caller may see it (a viewer), else 404."""
        seen = await self.database.read(
            math.inf, lambda connection: _get(connection, principal, task_id)
        )
        if seen is not None:
            raise ForbiddenError("Viewers of a project may not change its tasks")
        raise TaskNotFoundError()

    async def _reassign(
        self, principal: Principal, task_id: uuid.UUID, data: TaskUpdate, changes: dict[str, Any]
    ) -> bytes:
        """A change of project or assignees: read and lock the task, check both projects and
        the assignees, then write it (moving its row when the tenant changes)."""
        changes.pop("project_id", None)
        changes.pop("assignees", None)
        async with self.database.unit_of_work() as work:
            tasks = TaskRepository(work)
            task = await tasks.get_for_update(
                task_id, caller=principal.subject, viewer=_viewer(principal)
            )
            if task is None:
                raise TaskNotFoundError()
            if not holds(principal, task["role"], ProjectRole.EDITOR):
                raise ForbiddenError("Viewers of a project may not change its tasks")
            audience = list(task["audience"])
            project_id, owner = task["project_id"], task["owner"]
            project: Mapping[str, Any] | None = None
            if data.project_id is not None and data.project_id != project_id:
                project = await _editable_project(work, principal, data.project_id)
                project_id, owner = data.project_id, project["owner"]
                audience += project["audience"]
                changes.update(project_id=project_id, owner=owner)
            current = list(task["assignees"])
            # Without new assignees, a move keeps those who are members there too.
            wanted = current if data.assignees is None else data.assignees
            assignees = await _members(work, project_id, wanted, lenient=data.assignees is None)
            changes["assignees"] = [row["user_id"] for row in assignees]
            newly = [row for row in assignees if row["user_id"] not in current]
            if newly and project is None:  # the assignment mail names the project
                project = await MembershipRepository(work).access(project_id, principal.subject)
                assert project is not None  # locked with its task
            if project is not None:
                title = str(changes.get("title", task["title"]))
                for event in _assigned(principal, task_id, project, title, newly):
                    work.emit(event)
            updated = await tasks.update_row(task["owner"], task_id, changes)
            work.touches(*views_changed(audience))
        return task_json(updated)

    async def delete(self, principal: Principal, task_id: uuid.UUID) -> None:
        async with self.database.unit_of_work(single_statement=True) as work:
            task = await TaskRepository(work).delete(task_id)
            if task is not None:
                work.touches(*views_changed(task["audience"]))
        if task is None:
            raise TaskNotFoundError()


async def _editable_project(
    work: UnitOfWork[Any], principal: Principal, project_id: uuid.UUID
) -> Record:
    """The project, kept from moving until the change commits, if the caller may add or
    change tasks in it: 404 for a non-member, 403 for a viewer, 409 when it is archived."""
    access = await MembershipRepository(work).access(project_id, principal.subject, lock="share")
    project = allowed(principal, access, ProjectRole.EDITOR)
    if project["archived"]:
        raise ProjectArchivedError()
    return project


async def _members(
    work: UnitOfWork[Any], project_id: uuid.UUID, users: Sequence[str], *, lenient: bool = False
) -> list[Record]:
    """`users`' member rows (with their directory entries), in the order given, kept members
    until the change commits; 422 naming those who are not members, unless `lenient` (then
    they are left out)."""
    if not users:
        return []
    rows = await UserRepository(work).members(project_id, only=users, lock=True)
    found = {row["user_id"]: row for row in rows}
    missing = [((*_AT, n), user) for n, user in enumerate(users) if user not in found]
    if missing and not lenient:
        raise not_members(*missing)
    return [found[user] for user in users if user in found]


def _new_task(principal: Principal, task_id: uuid.UUID, data: TaskCreate) -> dict[str, Any]:
    return {
        "id": task_id,
        "created_by": principal.subject,
        "title": data.title,
        "description": data.description,
        "status": data.status.value,
        "assignees": data.assignees,
    }


def _created(principal: Principal, task_id: uuid.UUID, owner: str, data: TaskCreate) -> NewEvent:
    return NewEvent(
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


def _assigned(
    principal: Principal,
    task_id: uuid.UUID,
    project: Mapping[str, Any],
    title: str,
    assignees: Sequence[Record],
) -> list[NewEvent]:
    """One event per user of `assignees` (newly assigned) whom someone else assigned: their
    e-mail."""
    return [
        NewEvent(
            kind=TASK_ASSIGNED,
            aggregate_id=task_id,
            owner=project["owner"],
            actor=principal.subject,
            payload={
                "title": title,
                "project": project["name"],
                "assigned_by": principal.name or principal.username or principal.subject,
                "assignee": row["user_id"],
                "email": row["email"],
            },
        )
        for row in assignees
        if row["user_id"] != principal.subject
    ]


# Both async: FastAPI runs a plain `def` dependency in a worker thread, a hop per request.
async def get_task_reader(request: Request) -> TaskReader:
    return TaskReader(
        request_database(request), request_cache(request), partial(remember_caller, request)
    )


async def get_task_service(request: Request) -> TaskService:
    await remember_caller(request)
    return TaskService(request_database(request), request_cache(request))


TaskReaderDep = Annotated[TaskReader, Depends(get_task_reader)]
TaskServiceDep = Annotated[TaskService, Depends(get_task_service)]
