"""Task counts per project, assignee and status, and a row per assignment, kept by triggers.

A list's total was counted from the index of the project's tasks on every read, in time that
grows with the project (a member of twenty projects of a few thousand tasks each: ~10 ms at
10M rows). `task_counts` holds each project's count per status, of all its tasks (assignee
'') and of each assignee's. Three statement triggers on `tasks` (insert, update, delete)
add what each statement changed, in its transaction: a moved row (another project or
tenant) counts out of the old key and into the new one. Each statement's changes are added
up first and written in key order, so that two transactions never wait for each other's
counts in opposite orders; a statement that changes no status, assignee, project or tenant
(a new title) writes none. `TRUNCATE tasks` empties both tables too. The statement
triggers are the parent table's: a write aimed at a partition itself (`tasks_p3`) bypasses
them, as it bypasses the partitioning; nothing of taskapp does that.

`task_assignments` holds a row per (task, assignee) with the task's tenant, project, status
and creation time, indexed by (owner, user, created_at): the tasks assigned to someone,
newest first, are an ordered scan per tenant. The GIN index of `tasks.assignees` finds them
all, unordered, so a page of them cost as much as all of them. Row triggers keep it, with
WHEN clauses that skip a task without assignees and a change that leaves its assignees,
status and project alone (a statement trigger over transition tables cost a status change
~0.2 ms of the server's time; these cost it nothing unless the task is assigned).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The deltas of one statement: +1 per new row, -1 per old row, for all the project's tasks
# (assignee '') and for each of the row's assignees; added up per key, in key order.
_APPLY = """
    INSERT INTO task_counts AS c (owner, project_id, assignee, status, tasks)
    SELECT owner, project_id, assignee, status, sum(delta) FROM ({rows}) AS changed
    GROUP BY owner, project_id, assignee, status
    HAVING sum(delta) <> 0
    ORDER BY owner, project_id, assignee, status
    ON CONFLICT (owner, project_id, assignee, status)
    DO UPDATE SET tasks = c.tasks + excluded.tasks
"""
_DELTAS = """
    SELECT owner, project_id, '' AS assignee, status, {sign}1 AS delta FROM {table}
    UNION ALL
    SELECT owner, project_id, unnest(assignees), status, {sign}1 FROM {table}
"""
_NEW = _DELTAS.format(sign="", table="new_rows")
_OLD = _DELTAS.format(sign="-", table="old_rows")
_COUNTS = {
    "insert": _APPLY.format(rows=_NEW),
    "update": _APPLY.format(rows=f"{_NEW} UNION ALL {_OLD}"),
    "delete": _APPLY.format(rows=_OLD),
}
# A task's assignments, as `task_assignments` holds them: each written by a row trigger
# whose WHEN clause PostgreSQL checks without calling it, so a task without assignees, or
# a change that leaves them, their project, status and tenant alone, costs nothing here. (A
# task whose new tenant is in another partition moves: PostgreSQL runs that UPDATE as a
# DELETE and an INSERT, and fires their triggers; one whose new tenant hashes to the same
# partition is updated in place, and its rows follow it here.)
_ASSIGN = """
    INSERT INTO task_assignments (owner, task_id, user_id, project_id, status, created_at)
    SELECT {row}.owner, {row}.id, assignee, {row}.project_id, {row}.status, {row}.created_at
    FROM unnest({row}.assignees) AS assignee
"""
_UNASSIGN = "DELETE FROM task_assignments WHERE owner = OLD.owner AND task_id = OLD.id"
_ASSIGNMENTS = {
    "insert": ("cardinality(NEW.assignees) > 0", _ASSIGN.format(row="NEW")),
    "update": (
        "(cardinality(OLD.assignees) > 0 OR cardinality(NEW.assignees) > 0)"
        " AND (OLD.owner, OLD.assignees, OLD.project_id, OLD.status)"
        " IS DISTINCT FROM (NEW.owner, NEW.assignees, NEW.project_id, NEW.status)",
        f"IF OLD.assignees IS DISTINCT FROM NEW.assignees THEN {_UNASSIGN};"
        f" {_ASSIGN.format(row='NEW')}; ELSE UPDATE task_assignments"
        " SET owner = NEW.owner, project_id = NEW.project_id, status = NEW.status"
        " WHERE owner = OLD.owner AND task_id = OLD.id; END IF",
    ),
    "delete": ("cardinality(OLD.assignees) > 0", _UNASSIGN),
}
# Every count from the tasks as they are (the migration, a bulk load).
COUNT_ALL = """
    INSERT INTO task_counts (owner, project_id, assignee, status, tasks)
    SELECT owner, project_id, assignee, status, count(*)
    FROM (SELECT owner, project_id, status, ARRAY[''] || assignees AS assignees FROM tasks) t,
         unnest(t.assignees) AS assignee
    GROUP BY owner, project_id, assignee, status
"""
_REFERENCING = {
    "insert": "NEW TABLE AS new_rows",
    "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "OLD TABLE AS old_rows",
}


def upgrade() -> None:
    op.create_table(
        "task_counts",
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("assignee", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tasks", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "owner", "project_id", "assignee", "status", name=op.f("pk_task_counts")
        ),
    )
    op.create_table(
        "task_assignments",
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "task_id", "user_id", name=op.f("pk_task_assignments")),
    )
    # The counts take '' for "all the tasks": no assignee may be '' (nor NULL).
    op.create_check_constraint(
        op.f("ck_tasks_assignees_valid"),
        "tasks",
        "array_position(assignees, NULL) IS NULL AND NOT ('' = ANY (assignees))",
    )
    # Taken before the tasks are read, so no change falls between reading and the triggers.
    op.execute("LOCK TABLE tasks IN SHARE MODE")
    op.execute(COUNT_ALL)
    op.execute(
        "INSERT INTO task_assignments (owner, task_id, user_id, project_id, status, created_at)"
        " SELECT owner, id, unnest(assignees), project_id, status, created_at FROM tasks"
    )
    op.create_index(
        "ix_task_assignments_owner_user_id_created_at_task_id",
        "task_assignments",
        ["owner", "user_id", sa.text("created_at DESC"), sa.text("task_id DESC")],
        postgresql_include=["project_id", "status"],
    )
    for event, body in _COUNTS.items():
        op.execute(
            f"CREATE FUNCTION task_counts_{event}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body}; RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER task_counts_{event} AFTER {event.upper()} ON tasks"
            f" REFERENCING {_REFERENCING[event]}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION task_counts_{event}()"
        )
    for event, (when, body) in _ASSIGNMENTS.items():
        op.execute(
            f"CREATE FUNCTION task_assignments_{event}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN {body}; RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER task_assignments_{event} AFTER {event.upper()} ON tasks"
            f" FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION task_assignments_{event}()"
        )
    # TRUNCATE tasks (no rows to count out) empties the counts and assignments with it.
    op.execute(
        "CREATE FUNCTION task_counts_truncate() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN TRUNCATE task_counts, task_assignments; RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER task_counts_truncate AFTER TRUNCATE ON tasks"
        " FOR EACH STATEMENT EXECUTE FUNCTION task_counts_truncate()"
    )


def downgrade() -> None:
    for event in [*_COUNTS, "truncate"]:
        op.execute(f"DROP TRIGGER task_counts_{event} ON tasks")
        op.execute(f"DROP FUNCTION task_counts_{event}()")
    for event in _ASSIGNMENTS:
        op.execute(f"DROP TRIGGER task_assignments_{event} ON tasks")
        op.execute(f"DROP FUNCTION task_assignments_{event}()")
    op.drop_table("task_assignments")
    op.drop_table("task_counts")
    op.drop_constraint(op.f("ck_tasks_assignees_valid"), "tasks", type_="check")
