"""EXPLAIN ANALYZE of the SQL the service sends for the benchmark's per-owner scenarios.

The statements come from the real repository (captured as they are sent, with their
parameters), run inside a transaction that is rolled back, so nothing changes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg

from taskapp.database.driver import Connection, connect_arguments
from taskapp.membership.models import inbox_id
from taskapp.membership.repository import MembershipRepository
from taskapp.tasks.repository import Scope, TaskFilter, TaskRepository

PARTITION = re.compile(r"tasks_p\d+")


@dataclass
class Plan:
    scenario: str
    statement: str
    scans: list[tuple[str, str, str]]  # node type, relation, index
    execution_ms: float
    # The partitions the statement may read (those of the caller's tenants); None: one.
    allowed: list[str] | None = None

    @property
    def partitions(self) -> set[str]:
        return {relation for _, relation, _ in self.scans if PARTITION.fullmatch(relation)}

    @property
    def ok(self) -> bool:
        """One partition of `tasks`, read through an index (plain, index-only or bitmap)."""
        indexed = not any("Seq" in node for node, _, _ in self.scans)
        if self.allowed is not None:
            return bool(self.partitions) and self.partitions <= set(self.allowed) and indexed
        return len(self.partitions) == 1 and indexed

    def summary(self) -> str:
        scans = ", ".join(
            f"{node} on {relation} using {index}" for node, relation, index in self.scans
        )
        return f"{self.execution_ms:.2f} ms: {scans}"


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    found, stack = [], [plan]
    while stack:
        node = stack.pop()
        if node.get("Actual Loops") == 0:
            continue  # pruned as the plan started
        children = node.get("Plans", [])
        if "Relation Name" in node and "Scan" in node["Node Type"]:
            # A bitmap heap scan names its index on the Bitmap Index Scan below it.
            index = node.get("Index Name") or next(
                (child["Index Name"] for child in children if "Index Name" in child), "-"
            )
            found.append((node["Node Type"], node["Relation Name"], index))
        stack.extend(children)
    return found


Call = Callable[[TaskRepository], Awaitable[Any]]


@asynccontextmanager
async def _rolled_back(raw: asyncpg.Connection) -> AsyncIterator[None]:
    """A savepoint, rolled back after the block whatever it did."""
    transaction = raw.transaction()
    await transaction.start()
    try:
        yield
    finally:
        await transaction.rollback()


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):  # of ids or names: no commas, quotes or braces
        return "'{" + ",".join(str(item) for item in value) + "}'"
    return "'" + str(value).replace("'", "''") + "'"


async def _explain(
    raw: asyncpg.Connection, scenario: str, call: Call, allowed: list[str] | None = None
) -> list[Plan]:
    sent: list[tuple[str, Sequence[Any]]] = []

    def capture(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        if "tasks" in statement:
            sent.append((statement, arguments))

    async with _rolled_back(raw):
        await call(TaskRepository(Connection(raw, [capture])))
    plans = []
    for statement, arguments in sent:
        # As the API runs it: a prepared statement's generic plan (see the repository).
        async with _rolled_back(raw):
            await raw.execute(f"PREPARE bench_probe AS {statement}")
            values = ", ".join(_literal(value) for value in arguments)
            raw_plan: Any = await raw.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE bench_probe({values})"
            )
            await raw.execute("DEALLOCATE bench_probe")
        top = (json.loads(raw_plan) if isinstance(raw_plan, str) else raw_plan)[0]
        scans = _scans(top["Plan"])
        plans.append(Plan(scenario, statement, scans, top["Execution Time"], allowed))
    return plans


async def explain_scenarios(
    database_url: str, *, owner: str, deep_offset: int, task_id: str, small: bool = False
) -> list[Plan]:
    """Plans of scenario 2 (a deep page of a heavy owner), 3 (read by id) and 5 (update).

    `small`: a test-sized table, where a sequential scan is rightly cheapest; the planner is
    then asked whether an index serves.
    """
    identifier = uuid.UUID(task_id)
    # The owner's own view: their Inbox, the only project a seeded owner is a member of.
    scope = Scope((inbox_id(owner),), (owner,))
    raw = await asyncpg.connect(**connect_arguments(database_url))
    try:
        async with _rolled_back(raw):
            await raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            if small:
                await raw.execute("SET LOCAL enable_seqscan = off")
            plans = await _explain(
                raw,
                "2 list (deep page)",
                lambda r: r.list(TaskFilter(scope=scope), offset=deep_offset, limit=10),
            )
            plans += await _explain(raw, "3 get", lambda r: r.get(identifier, scope=scope))
            plans += await _explain(
                raw,
                "5 patch",
                # Among the tenants this process last read of the owner's projects.
                lambda r: r.update(identifier, {"status": "completed"}, viewer=owner, within=scope),
            )
    finally:
        await raw.close()
    return plans


async def _partitions_of(raw: asyncpg.Connection, owners: Sequence[str]) -> list[str]:
    """The partitions of `tasks` that hold the tasks of `owners`, as PostgreSQL routes them."""
    rows = await raw.fetch(
        """
        SELECT DISTINCT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid, unnest($1::text[]) AS o(owner)
        WHERE i.inhparent = 'tasks'::regclass
          AND satisfies_hash_partition('tasks'::regclass, 8,
                (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'remainder (\\d+)'))[1]::int,
                o.owner::varchar)
        """,
        list(owners),
    )
    return sorted(row["relname"] for row in rows)


async def explain_shared(
    database_url: str, *, user: str, project: str, small: bool = False
) -> list[Plan]:
    """Plans of the shared scenarios for `user` (a member of many projects): 7 their list,
    8 one of their projects (`project`), 9 the tasks assigned to them; each may read only
    the partitions of the tenants of `user`'s projects."""
    raw = await asyncpg.connect(**connect_arguments(database_url))
    try:
        memberships = await MembershipRepository(Connection(raw)).memberships(user)
        scope = Scope.of(memberships)
        one = scope.only(uuid.UUID(project))
        if one is None:
            raise ValueError(f"{user} is not a member of {project}")
        async with _rolled_back(raw):
            await raw.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            if small:
                await raw.execute("SET LOCAL enable_seqscan = off")
            theirs = await _partitions_of(raw, scope.owners)
            plans = await _explain(
                raw,
                f"7 list ({len(scope.projects)} projects)",
                lambda r: r.list(TaskFilter(scope=scope), offset=0, limit=10),
                theirs,
            )
            plans += await _explain(
                raw,
                "8 one project",
                lambda r: r.list(TaskFilter(scope=one), offset=0, limit=10),
                await _partitions_of(raw, one.owners),
            )
            plans += await _explain(
                raw,
                "9 assigned to me",
                lambda r: r.list(TaskFilter(scope=scope, assignee=user), offset=0, limit=10),
                theirs,
            )
    finally:
        await raw.close()
    return plans
