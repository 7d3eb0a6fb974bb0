"""The service through PgBouncer in transaction pooling mode (`TASKAPP_DATABASE_PGBOUNCER`):
many client connections share two server connections, and every request still gets the
right answer; the migrations run through it too. Without the setting, the same traffic
breaks on prepared statements another client left on a shared server connection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy import literal, select

from taskapp.app import create_app
from taskapp.config import DatabaseSettings
from taskapp.database.engine import create_sync_engine
from taskapp.database.migrations import upgrade_database
from testing.oidc import OIDCProvider
from testing.pgbouncer import PgBouncer, pgbouncer
from testing.services import scratch_database
from tests.conftest import SettingsFactory, running

pytestmark = pytest.mark.slow

USERS = 8
TASKS_PER_USER = 6


@pytest.fixture(scope="module")
def database(postgres_admin_url: str) -> Iterator[str]:
    with scratch_database(postgres_admin_url, prefix="taskapp_pgbouncer") as url:
        upgrade_database(url)
        yield url


async def _session(client: httpx.AsyncClient, oidc: OIDCProvider, owner: str) -> list[str]:
    """One user's create, read, list, change and delete traffic, checked as it goes; the
    titles the user ends with."""
    me, admin = oidc.auth(owner), oidc.auth("root", ["admin"])
    created = await asyncio.gather(
        *(
            client.post("/tasks", json={"title": f"{owner} {n}"}, headers=me)
            for n in range(TASKS_PER_USER)
        )
    )
    assert [r.status_code for r in created] == [201] * TASKS_PER_USER, [r.text for r in created]
    ids = [r.json()["id"] for r in created]
    read = await asyncio.gather(*(client.get(f"/tasks/{i}", headers=me) for i in ids))
    assert [r.status_code for r in read] == [200] * TASKS_PER_USER, [r.text for r in read]
    assert [r.json()["title"] for r in read] == [f"{owner} {n}" for n in range(TASKS_PER_USER)]
    changed = await asyncio.gather(
        *(
            client.patch(
                f"/tasks/{i}", json={"title": f"{owner} {n}!", "status": "completed"}, headers=me
            )
            for n, i in enumerate(ids)
        )
    )
    assert [r.status_code for r in changed] == [200] * TASKS_PER_USER, [r.text for r in changed]
    deleted = await client.delete(f"/tasks/{ids[0]}", headers=admin)
    assert deleted.status_code == 204, deleted.text
    page = await client.get("/tasks?page_size=100", headers=me)
    assert page.status_code == 200, page.text
    assert page.json()["total"] == TASKS_PER_USER - 1
    assert {t["status"] for t in page.json()["items"]} == {"completed"}
    return sorted(t["title"] for t in page.json()["items"])


async def _traffic(
    make_settings: SettingsFactory, oidc: OIDCProvider, bouncer: PgBouncer, **database: Any
) -> list[list[str] | BaseException]:
    app = create_app(
        make_settings(
            database={"url": bouncer.url, "pool_size": 10, "max_overflow": 0, **database},
            cache={"enabled": False},  # every read reaches the database
        )
    )
    owners = [f"bouncer-{uuid.uuid4().hex[:8]}" for _ in range(USERS)]
    async with running(app) as client:
        results = await asyncio.gather(
            *(_session(client, oidc, owner) for owner in owners), return_exceptions=True
        )
        clients = [c for c in bouncer.show("CLIENTS") if c["database"] == bouncer.database]
        assert len(clients) > 2  # the app's connections, more than the servers behind them
    for owner, titles in zip(owners, results, strict=True):
        if not isinstance(titles, BaseException):
            assert titles == [f"{owner} {n}!" for n in range(1, TASKS_PER_USER)]
    return results


async def test_the_api_works_through_pgbouncer_in_transaction_mode(
    make_settings: SettingsFactory, oidc: OIDCProvider, database: str
) -> None:
    with pgbouncer(database, pool_size=2) as bouncer:
        results = await _traffic(make_settings, oidc, bouncer, pgbouncer=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures == []
        servers = [s for s in bouncer.show("SERVERS") if s["database"] == bouncer.database]
        assert 1 <= len(servers) <= 2
        [stats] = [s for s in bouncer.show("STATS") if s["database"] == bouncer.database]
        # Each request's statements ran as transactions PgBouncer could hand to any server.
        assert int(stats["total_xact_count"]) >= USERS * (3 * TASKS_PER_USER + 2)


async def test_without_the_setting_shared_server_connections_break(
    make_settings: SettingsFactory, oidc: OIDCProvider, database: str
) -> None:
    """The negative control: named prepared statements and autocommit, with the startup
    parameters PgBouncer would refuse ignored, so only the statements are at fault."""
    ignore = "ignore_startup_parameters = plan_cache_mode, statement_timeout"
    with pgbouncer(database, pool_size=2, extra=ignore) as bouncer:
        results = await _traffic(make_settings, oidc, bouncer)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures
    assert all(isinstance(r, AssertionError) and "500" in str(r) for r in failures), failures


async def test_startup_parameters_are_not_sent_through_pgbouncer(
    make_settings: SettingsFactory, database: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pgbouncer(database) as bouncer:
        refused = create_app(make_settings(database={"url": bouncer.url}))
        async with running(refused) as client:
            assert (await client.get("/readyz")).status_code == 503
        assert "unsupported startup parameter" in bouncer.log()
        accepted = create_app(make_settings(database={"url": bouncer.url, "pgbouncer": True}))
        capfd.readouterr()
        async with running(accepted) as client:
            assert (await client.get("/readyz")).status_code == 200
        # The statement timeout cannot travel through PgBouncer, and this role has none.
        assert "ALTER ROLE ... SET statement_timeout = '15s'" in capfd.readouterr().err


def test_migrations_run_through_pgbouncer(
    postgres_admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKAPP_DATABASE_PGBOUNCER", "true")
    with (
        scratch_database(postgres_admin_url, prefix="taskapp_pgbouncer") as fresh,
        pgbouncer(fresh) as bouncer,
    ):
        upgrade_database(bouncer.url)

        async def tables() -> set[str]:
            connection = await asyncpg.connect(fresh)
            try:
                rows = await connection.fetch(
                    "SELECT relname FROM pg_class WHERE relname IN "
                    "('tasks', 'events', 'deliveries', 'alembic_version')"
                )
            finally:
                await connection.close()
            return {row["relname"] for row in rows}

        assert asyncio.run(tables()) == {"tasks", "events", "deliveries", "alembic_version"}


@pytest.mark.parametrize("pgbouncer_setting", [True, False])
def test_job_connections_share_a_server_through_pgbouncer(
    database: str, pgbouncer_setting: bool
) -> None:
    """The Celery jobs' psycopg connections: two clients, one server connection, the same
    statement many times each (psycopg would prepare it by name from the fifth time)."""
    with pgbouncer(database, pool_size=1) as bouncer:
        settings = DatabaseSettings(_env_file=None, url=bouncer.url, pgbouncer=pgbouncer_setting)
        engines = [create_sync_engine(settings) for _ in range(2)]
        try:

            def run_all() -> list[int]:
                answers = []
                for n in range(8):
                    for engine in engines:
                        with engine.begin() as connection:
                            answers.append(connection.execute(select(literal(n) + 1)).scalar_one())
                return answers

            if pgbouncer_setting:
                assert run_all() == [n + 1 for n in range(8) for _ in engines]
            else:
                with pytest.raises(sa_exc.ProgrammingError, match="prepared statement"):
                    run_all()
        finally:
            for engine in engines:
                engine.dispose()
