"""The benchmark's data set and its query-plan check (the load itself runs in `make bench`)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bench.plans import explain_scenarios, explain_shared
from bench.seed import (
    BUSY_PROJECTS,
    HEAVY_OWNERS,
    LARGE_MEMBERS,
    LARGE_PROJECTS,
    owner_sizes,
    seed,
    seed_shared,
)
from taskapp.database.migrations import upgrade_database
from testing.processes import clean_env
from testing.services import scratch_database

ROOT = Path(__file__).resolve().parents[2]


def test_owner_sizes_are_skewed_and_exact() -> None:
    sizes = owner_sizes(1_000_000, 10_000, random.Random(1))
    assert sum(sizes) == 1_000_000
    assert len(sizes) == 10_000
    assert min(sizes) >= 1
    # A few owners with 10,000+ tasks, most with tens to hundreds.
    assert sum(size >= 10_000 for size in sizes) == HEAVY_OWNERS
    median = sorted(sizes)[len(sizes) // 2]
    assert 20 <= median <= 200, median


def test_too_few_rows_for_the_owners_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot spread"):
        owner_sizes(50, 100, random.Random(1))


def test_seed_loads_what_it_reports_and_plans_use_one_partition(
    postgres_admin_url: str,
) -> None:
    with scratch_database(postgres_admin_url, prefix="taskapp_bench_test") as url:
        upgrade_database(url)
        dataset = seed(url, rows=20_000, owners=200, samples=5)
        with psycopg.connect(url) as connection:
            rows = connection.execute("SELECT owner, count(*) FROM tasks GROUP BY owner").fetchall()
            indexes = connection.execute(
                "SELECT tablename, count(*) FROM pg_indexes WHERE tablename LIKE 'tasks%'"
                " GROUP BY tablename"
            ).fetchall()
            invalid = connection.execute(
                "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
            ).fetchone()
            statuses = connection.execute("SELECT DISTINCT status FROM tasks").fetchall()
        assert dict(rows) == dict(zip(dataset.owners, dataset.sizes, strict=True))
        # The primary key and the six indexes, rebuilt after the load on every partition.
        assert dict(indexes) == {name: 7 for name in ["tasks", *[f"tasks_p{i}" for i in range(8)]]}
        with psycopg.connect(url) as connection:
            inboxes = connection.execute(
                "SELECT count(*) FROM projects JOIN project_members m ON m.project_id = projects.id"
                " AND m.user_id = projects.owner AND m.role = 'admin' WHERE personal"
            ).fetchone()
        assert inboxes == (len(dataset.owners),)  # every owner's Inbox, as the API makes it
        assert invalid == (0,)
        assert {status for (status,) in statuses} == {"pending", "in_progress", "completed"}
        assert all(len(ids) == min(5, size) for ids, size in
                   zip(dataset.sample_ids.values(), dataset.sizes, strict=True))  # fmt: skip

        heavy = dataset.owners[0]
        task_id = dataset.sample_ids[heavy][0]
        row_query = "SELECT status, updated_at FROM tasks WHERE id = %s"
        with psycopg.connect(url) as connection:
            before = connection.execute(row_query, (task_id,)).fetchone()
        plans = asyncio.run(
            explain_scenarios(
                url.replace("postgresql://", "postgresql+asyncpg://", 1),
                owner=heavy,
                deep_offset=dataset.sizes[0] - 10,
                task_id=task_id,
                small=True,
            )
        )
        assert {plan.scenario for plan in plans} == {"2 list (deep page)", "3 get", "5 patch"}
        for plan in plans:
            assert plan.ok, plan.summary()
            # Reads name the caller's tenants; so does a change by id, from a kept scope.
            assert len(plan.partitions) == 1
        with psycopg.connect(url) as connection:  # the update was explained, not kept
            assert connection.execute(row_query, (task_id,)).fetchone() == before


def test_shared_seed_loads_teams_and_plans_read_their_tenants_partitions(
    postgres_admin_url: str,
) -> None:
    with scratch_database(postgres_admin_url, prefix="taskapp_bench_test") as url:
        upgrade_database(url)
        dataset = seed_shared(url, rows=20_000, users=400, projects=40, busy=10)
        assert dataset.rows == 20_000
        with psycopg.connect(url) as connection:
            tasks = connection.execute("SELECT count(*) FROM tasks").fetchone()
            shared: dict[str, int] = dict(
                connection.execute(
                    "SELECT p.id::text, count(m.user_id) FROM projects p"
                    " JOIN project_members m ON m.project_id = p.id"
                    " WHERE NOT p.personal GROUP BY p.id"
                ).fetchall()
            )
            strangers = connection.execute(
                "SELECT count(*) FROM tasks t WHERE cardinality(assignees) > 0 AND EXISTS"
                " (SELECT 1 FROM unnest(t.assignees) a WHERE NOT EXISTS (SELECT 1 FROM"
                " project_members m WHERE m.project_id = t.project_id AND m.user_id = a))"
            ).fetchone()
            counts = connection.execute(
                "SELECT sum(tasks) FROM task_counts WHERE assignee = ''"
            ).fetchone()
            assignments = connection.execute(
                "SELECT (SELECT count(*) FROM task_assignments),"
                " (SELECT count(*) FROM tasks, unnest(assignees))"
            ).fetchone()
            busy, joined = next(iter(dataset.busy.items()))
            visible = connection.execute(
                "SELECT count(*) FROM tasks WHERE project_id IN"
                " (SELECT project_id FROM project_members WHERE user_id = %s)",
                (busy,),
            ).fetchone()
        assert tasks == (20_000,)
        assert counts == (20_000,)  # counted after the load, as the triggers would have
        assert assignments is not None
        assert assignments[0] == assignments[1] > 0
        assert strangers == (0,)  # every assignee a member of the task's project
        assert len(shared) == 40
        large = {str(p.id) for p in dataset.projects[:LARGE_PROJECTS]}
        assert all(n == LARGE_MEMBERS for p, n in shared.items() if p in large)
        assert all(2 <= n <= 50 + 10 for p, n in shared.items() if p not in large)
        for user, projects in dataset.busy.items():
            assert len(projects) == BUSY_PROJECTS, user
        assert visible == (dataset.visible(busy),)

        plans = asyncio.run(
            explain_shared(
                url.replace("postgresql://", "postgresql+asyncpg://", 1),
                user=busy,
                project=str(joined[0].id),
                small=True,
            )
        )
        assert [plan.scenario[0] for plan in plans] == ["7", "8", "9"]
        for plan in plans:
            assert plan.ok, plan.summary()
            assert plan.allowed is not None
            assert plan.partitions <= set(plan.allowed)
        assert len(plans[1].partitions) == 1  # one project: its tenant's partition


@pytest.mark.parametrize("kind", ["get", "create"])
def test_calls_profiles_the_requests_of_a_kind(
    postgres_admin_url: str, redis_url: str, kind: str
) -> None:
    """`python -m bench.calls` serves real requests in process and reports the app's calls."""
    env = clean_env(TASKAPP_TEST_DATABASE_URL=postgres_admin_url, TASKAPP_TEST_REDIS_URL=redis_url)
    done = subprocess.run(
        [sys.executable, "-m", "bench.calls", "--kind", kind, "--users", "4", "--tasks", "3",
         "--requests", "24", "--top", "60"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"{kind}: 24 requests, "), first
    calls = int(first.split(", ")[1].split()[0].replace(",", ""))
    assert 100 < calls < 5_000, first
    # The profile holds the app's own code on the request's path.
    handler = "create" if kind == "create" else "get"
    assert "taskapp/tasks/service.py" in done.stdout
    assert f"({handler})" in done.stdout


@pytest.mark.parametrize(
    ("argv", "accepted"),
    [
        (["--scenarios", "2,10"], True),
        (["--scenarios", "7,8,9", "--dataset", "shared"], True),
        (["--scenarios", "1,7"], False),  # a shared scenario on the owners' data set
        (["--scenarios", "7,10", "--dataset", "shared"], False),  # and the other way
        (["--scenarios", "11"], False),
    ],
)
def test_scenarios_run_only_on_their_own_data_set(argv: list[str], accepted: bool) -> None:
    from bench.run import _arguments

    if accepted:
        assert {int(n) for n in _arguments(argv).scenarios.split(",")} == {
            int(n) for n in argv[1].split(",")
        }
    else:
        with pytest.raises(SystemExit) as exited:
            _arguments(argv)
        assert exited.value.code == 2
