"""deploy/postgres/init-databases.sh, run as the PostgreSQL image runs it on a first start,
against a PostgreSQL server of the test's own; then the migrations, as the role it made."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from taskapp.cli.embedded import embedded_postgres
from taskapp.database.migrations import upgrade_database
from tests.deploy.stack import DEPLOY

SCRIPT = DEPLOY / "postgres" / "init-databases.sh"
# A quote and a backslash: the script must pass passwords to SQL quoted, whatever they hold.
TASKAPP_PASSWORD = "t4sk'app\\pass-0123456789"
KEYCLOAK_PASSWORD = "k3y'cloak\\pass-0123456789"


@pytest.fixture(scope="module")
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh server, after the init script ran as the image's entrypoint runs it."""
    with embedded_postgres(tmp_path_factory.mktemp("pg"), database="postgres") as url:
        socket_dir = url.split("host=", 1)[1]
        import pgserver

        psql_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
        result = subprocess.run(
            ["sh", str(SCRIPT)],
            env={
                "PATH": f"{psql_dir}:{os.environ.get('PATH', '')}",
                "PGHOST": socket_dir,
                "POSTGRES_USER": "postgres",
                "TASKAPP_DB_PASSWORD": TASKAPP_PASSWORD,
                "KEYCLOAK_DB_PASSWORD": KEYCLOAK_PASSWORD,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        yield socket_dir


def query(socket_dir: str, sql: str, database: str = "postgres") -> list[tuple[object, ...]]:
    with psycopg.connect(host=socket_dir, user="postgres", dbname=database) as connection:
        return connection.execute(sql).fetchall()


def test_the_image_runs_the_script(socket_dir: str) -> None:
    # docker-entrypoint-initdb.d executes *.sh files that are executable (sources the others).
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/bin/sh\n")


def test_each_service_gets_a_role_and_a_database_of_its_own(socket_dir: str) -> None:
    roles = query(
        socket_dir,
        "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole,"
        " rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid"
        " WHERE rolname IN ('taskapp', 'keycloak') ORDER BY rolname",
    )
    assert roles == [
        ("keycloak", True, False, False, False, True),
        ("taskapp", True, False, False, False, True),
    ]
    owners = query(
        socket_dir,
        "SELECT datname, pg_get_userbyid(datdba) FROM pg_database"
        " WHERE datname IN ('taskapp', 'keycloak') ORDER BY datname",
    )
    assert owners == [("keycloak", "keycloak"), ("taskapp", "taskapp")]


def test_neither_role_may_connect_to_the_other_database(socket_dir: str) -> None:
    rows = query(
        socket_dir,
        "SELECT r, d, has_database_privilege(r, d, 'CONNECT')"
        " FROM unnest(ARRAY['taskapp', 'keycloak']) r, unnest(ARRAY['taskapp', 'keycloak']) d"
        " ORDER BY r, d",
    )
    assert rows == [
        ("keycloak", "keycloak", True),
        ("keycloak", "taskapp", False),
        ("taskapp", "keycloak", False),
        ("taskapp", "taskapp", True),
    ]


def test_the_migrations_apply_as_the_taskapp_role(socket_dir: str) -> None:
    upgrade_database(f"postgresql+asyncpg://taskapp@/taskapp?host={socket_dir}")
    tables = query(
        socket_dir,
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename IN ('tasks', 'alembic_version') ORDER BY tablename",
        database="taskapp",
    )
    assert tables == [("alembic_version", "taskapp"), ("tasks", "taskapp")]
