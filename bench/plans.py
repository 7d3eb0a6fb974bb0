"""EXPLAIN ANALYZE of the SQL the service sends for the benchmark's per-owner scenarios.

The statements come from the real repository (captured as they are sent, with their
parameters), run inside a transaction that is rolled back, so nothing changes.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from taskapp.tasks.repository import TaskRepository

PARTITION = re.compile(r"tasks_p\d+")


@dataclass
class Plan:
    scenario: str
    statement: str
    scans: list[tuple[str, str, str]]  # node type, relation, index
    execution_ms: float

    @property
    def partitions(self) -> set[str]:
        return {relation for _, relation, _ in self.scans if PARTITION.fullmatch(relation)}

    @property
    def ok(self) -> bool:
        """One partition of `tasks`, read through an index (plain, index-only or bitmap)."""
        return len(self.partitions) == 1 and not any("Seq" in node for node, _, _ in self.scans)

    def summary(self) -> str:
        scans = ", ".join(
            f"{node} on {relation} using {index}" for node, relation, index in self.scans
        )
        return f"{self.execution_ms:.2f} ms: {scans}"


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, str]]:
    found, stack = [], [plan]
    while stack:
        node = stack.pop()
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


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def _explain(connection: AsyncConnection, scenario: str, call: Call) -> list[Plan]:
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if "tasks" in statement and not statement.startswith("EXPLAIN"):
            sent.append((statement, parameters))

    event.listen(connection.sync_connection, "before_cursor_execute", capture)
    try:
        async with connection.begin_nested() as savepoint:
            await call(TaskRepository(connection))
            await savepoint.rollback()
    finally:
        event.remove(connection.sync_connection, "before_cursor_execute", capture)
    plans = []
    for statement, parameters in sent:
        # As the API runs it: a prepared statement's generic plan (see taskapp.db).
        async with connection.begin_nested() as savepoint:
            await connection.exec_driver_sql(f"PREPARE bench_probe AS {statement}")
            arguments = ", ".join(_literal(value) for value in parameters)
            result = await connection.exec_driver_sql(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE bench_probe({arguments})"
            )
            raw: Any = result.scalar()
            await connection.exec_driver_sql("DEALLOCATE bench_probe")
            await savepoint.rollback()
        top = (json.loads(raw) if isinstance(raw, str) else raw)[0]
        plans.append(Plan(scenario, statement, _scans(top["Plan"]), top["Execution Time"]))
    return plans


async def explain_scenarios(
    database_url: str, *, owner: str, deep_offset: int, task_id: str, small: bool = False
) -> list[Plan]:
    """Plans of scenario 2 (a deep page of a heavy owner), 3 (read by id) and 5 (update).

    `small`: a test-sized table, where a sequential scan is rightly cheapest; the planner is
    then asked whether an index serves.
    """
    engine = create_async_engine(database_url)
    identifier = uuid.UUID(task_id)
    try:
        async with engine.connect() as connection:
            await connection.begin()
            await connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            if small:
                await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plans = await _explain(
                connection,
                "2 list (deep page)",
                lambda r: r.list(owner=owner, status=None, offset=deep_offset, limit=10),
            )
            plans += await _explain(connection, "3 get", lambda r: r.get(identifier, owner=owner))
            plans += await _explain(
                connection,
                "5 patch",
                lambda r: r.update(identifier, {"status": "completed"}, owner=owner),
            )
            await connection.rollback()
    finally:
        await engine.dispose()
    return plans
