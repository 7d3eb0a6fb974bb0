"""The `taskapp` command as people use it: separate processes, real ports, real servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from taskapp.auth.devkey import DEV_ISSUER, DEV_KEY_FILE, load_or_create_dev_key
from testing.processes import TASKAPP, clean_env, running_server
from testing.services import free_port, scratch_database


def _wait_for_files(directory: Path, count: int, timeout: float = 20) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(directory.glob("*.eml")) if directory.exists() else []
        if len(files) >= count:
            return files
        time.sleep(0.1)
    pytest.fail(f"no {count} .eml files in {directory} after {timeout}s")


def _token(data_dir: Path, *args: str) -> str:
    result = subprocess.run(
        [TASKAPP, "token", *args],
        env=clean_env(TASKAPP_DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_token_is_keycloak_shaped_and_signed_with_the_dev_key(tmp_path):
    load_or_create_dev_key(tmp_path)  # as `taskapp run` does
    token = _token(tmp_path, "--sub", "alice", "--roles", "user", "--email", "alice@example.com")
    key = serialization.load_pem_private_key((tmp_path / DEV_KEY_FILE).read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    claims = jwt.decode(token, key.public_key(), algorithms=["RS256"], audience="taskapp-api")
    assert claims["iss"] == DEV_ISSUER
    assert claims["sub"] == "alice"
    assert claims["typ"] == "Bearer"
    assert "user" in claims["realm_access"]["roles"]
    assert claims["email"] == "alice@example.com"
    assert jwt.get_unverified_header(token)["kid"]
    assert (tmp_path / DEV_KEY_FILE).stat().st_mode & 0o077 == 0


def test_token_without_a_dev_key_says_to_start_run_first(tmp_path):
    result = subprocess.run(
        [TASKAPP, "token", "--sub", "alice", "--roles", "user"],
        env=clean_env(TASKAPP_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert f"no dev key in {tmp_path}" in result.stderr
    # A key made here would not be trusted by the running server: none is made.
    assert not (tmp_path / DEV_KEY_FILE).exists()


def test_token_refused_in_production(tmp_path):
    load_or_create_dev_key(tmp_path)
    result = subprocess.run(
        [TASKAPP, "token", "--sub", "alice", "--roles", "user"],
        env=clean_env(TASKAPP_DATA_DIR=str(tmp_path), TASKAPP_ENV="production"),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "refused when TASKAPP_ENV=production" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TASKAPP_ENV": "production"}, "TASKAPP_OIDC_ISSUER is required in production"),
        (
            {
                "TASKAPP_DATABASE_URL": "postgresql://x@127.0.0.1/x",
                "TASKAPP_REDIS_URL": "redis://127.0.0.1",
            },
            "taskapp serve needs TASKAPP_OIDC_ISSUER",
        ),
        (
            {
                "TASKAPP_DATABASE_URL": "postgresql://x@127.0.0.1/x",
                "TASKAPP_REDIS_URL": "redis://127.0.0.1",
                "TASKAPP_OIDC_TRUST_DEV_KEY": "true",
            },
            "taskapp serve needs TASKAPP_OIDC_ISSUER",
        ),
    ],
)
def test_serve_refuses_to_start_without_an_issuer(tmp_path, env, message):
    result = subprocess.run(
        [TASKAPP, "serve", "--port", str(free_port())],
        env=clean_env(TASKAPP_DATA_DIR=str(tmp_path), **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
def test_serve_uses_the_configured_provider_and_never_the_dev_key(tmp_path, serve_env, oidc):
    port = free_port()
    env = {**serve_env, "TASKAPP_OIDC_TRUST_DEV_KEY": "true"}
    load_or_create_dev_key(tmp_path)
    dev_token = _token(tmp_path, "--sub", "mallory", "--roles", "admin")
    with running_server(["serve", "--workers", "2"], env, port, tmp_path):
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/tasks", headers=oidc.auth("alice")).status_code == 200
        refused = httpx.get(f"{base}/tasks", headers={"Authorization": f"Bearer {dev_token}"})
        assert refused.status_code == 401
        assert "server" not in refused.headers


@pytest.mark.slow
def test_run_serves_the_readme_session_on_embedded_services(tmp_path):
    """`taskapp run` with nothing configured: embedded PostgreSQL + Redis, dev tokens, data kept."""
    port = free_port()
    data_dir = tmp_path / "data"
    # Set, as it may be in a shared .env: `taskapp run` keeps its worker's metrics in the
    # API's /metrics and starts no listener of the worker's own.
    worker_metrics_port = free_port()
    env = clean_env(
        TASKAPP_DATA_DIR=str(data_dir), TASKAPP_WORKER_METRICS_PORT=str(worker_metrics_port)
    )
    base = f"http://127.0.0.1:{port}"
    with running_server(["run"], env, port, tmp_path):
        alice = _token(
            data_dir, "--sub", "alice", "--roles", "user", "--email", "alice@example.com"
        )
        user = {"Authorization": f"Bearer {alice}"}
        admin = {"Authorization": f"Bearer {_token(data_dir, '--sub', 'root', '--roles', 'admin')}"}
        created = httpx.post(f"{base}/tasks", json={"title": "Write report"}, headers=user)
        assert created.status_code == 201
        # The notification reaches the local mail sink as an .eml file a person can open.
        mail = _wait_for_files(data_dir / "mail", 1)
        assert b"Subject: New task: Write report" in mail[0].read_bytes()
        assert b"To: alice@example.com" in mail[0].read_bytes()
        deadline = time.monotonic() + 10
        while 'taskapp_notifications_total{outcome="sent"} 1.0' not in (
            httpx.get(f"{base}/metrics", headers=user).text
        ):
            assert time.monotonic() < deadline, "the API's /metrics never counted the e-mail"
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{worker_metrics_port}/metrics")
        task_id = created.json()["id"]
        kept = httpx.post(f"{base}/tasks", json={"title": "Survives restarts"}, headers=user)
        assert kept.status_code == 201
        listed = httpx.get(f"{base}/tasks", headers=user).json()
        assert listed["total"] == 2
        assert httpx.get(f"{base}/tasks/{task_id}", headers=user).json()["title"] == "Write report"
        patched = httpx.patch(f"{base}/tasks/{task_id}", json={"status": "completed"}, headers=user)
        assert patched.json()["status"] == "completed"
        assert httpx.delete(f"{base}/tasks/{task_id}", headers=admin).status_code == 204
        assert httpx.get(f"{base}/readyz").json()["checks"] == {"database": "ok", "redis": "ok"}

    assert (data_dir / "postgres" / "PG_VERSION").exists()
    with running_server(["run"], env, port, tmp_path):
        user = {"Authorization": f"Bearer {_token(data_dir, '--sub', 'alice', '--roles', 'user')}"}
        titles = [t["title"] for t in httpx.get(f"{base}/tasks", headers=user).json()["items"]]
        assert titles == ["Survives restarts"]


@pytest.mark.slow
def test_run_uses_the_services_named_in_dot_env(tmp_path, database_url, redis_url):
    (tmp_path / ".env").write_text(
        f"TASKAPP_DATABASE_URL={database_url}\nTASKAPP_REDIS_URL={redis_url}\n"
    )
    port = free_port()
    with running_server(["run"], clean_env(), port, tmp_path):
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    assert not (tmp_path / ".taskapp" / "postgres").exists()
    assert not (tmp_path / ".taskapp" / "redis").exists()


@pytest.mark.slow
def test_run_refuses_a_second_instance_and_recovers_from_a_crash(tmp_path):
    data_dir = tmp_path / "data"
    env = clean_env(TASKAPP_DATA_DIR=str(data_dir))
    port = free_port()
    with running_server(["run"], env, port, tmp_path) as first:
        second = subprocess.run(
            [TASKAPP, "run", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0
        assert "already running" in second.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        # Crash: the whole process group dies at once, nothing is cleaned up.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)

    postmaster = data_dir / "postgres" / "postmaster.pid"
    with running_server(["run"], env, port, tmp_path):
        user = {"Authorization": f"Bearer {_token(data_dir, '--sub', 'alice', '--roles', 'user')}"}
        assert httpx.get(f"http://127.0.0.1:{port}/tasks", headers=user).status_code == 200
    # A clean stop after the crash stops the embedded PostgreSQL again.
    deadline = time.monotonic() + 10
    while postmaster.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not postmaster.exists()


def test_migrate_reports_an_unreachable_database_in_one_line(tmp_path):
    result = subprocess.run(
        [TASKAPP, "migrate"],
        env=clean_env(TASKAPP_DATABASE_URL="postgresql://nobody@127.0.0.1:9/none"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("taskapp: cannot migrate the database:")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_migrate_brings_an_empty_database_to_head(tmp_path, postgres_admin_url):
    with scratch_database(postgres_admin_url, prefix="taskapp_cli") as url:
        env = clean_env(TASKAPP_DATABASE_URL=url)
        for _ in range(2):  # a second run finds nothing to do
            result = subprocess.run(
                [TASKAPP, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True
            )
            assert result.returncode == 0, result.stderr
        check = subprocess.run(
            [
                sys.executable,
                "-c",
                f"from alembic import command; from taskapp.database.migrations import "
                f"alembic_config; command.check(alembic_config({url!r}))",
            ],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr


def test_worker_refuses_to_start_without_a_mail_server(tmp_path):
    result = subprocess.run(
        [TASKAPP, "worker"],
        env=clean_env(
            TASKAPP_DATABASE_URL="postgresql://x@127.0.0.1/x", TASKAPP_REDIS_URL="redis://127.0.0.1"
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "taskapp worker needs TASKAPP_SMTP_URL" in result.stderr


def _worker_metrics_env(**values: str) -> dict[str, str]:
    """What `taskapp worker` and `taskapp beat` need to start (nothing is reached before the
    metrics listener is set up), in production."""
    return clean_env(
        TASKAPP_ENV="production",
        TASKAPP_DATABASE_URL="postgresql://taskapp:real-password-0123@127.0.0.1:9/taskapp",
        TASKAPP_REDIS_URL="redis://127.0.0.1:9/0",
        TASKAPP_OIDC_ISSUER="https://sso.example.com/realms/taskapp",
        TASKAPP_SMTP_URL="smtp://127.0.0.1:9",
        **values,
    )


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_worker_metrics_need_the_scrape_token_in_production(tmp_path, command):
    result = subprocess.run(
        [TASKAPP, command],
        env=_worker_metrics_env(TASKAPP_WORKER_METRICS_PORT=str(free_port())),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TASKAPP_WORKER_METRICS_PORT needs TASKAPP_METRICS_TOKEN in production" in result.stderr


def test_worker_metrics_on_a_port_in_use_stop_the_start_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [TASKAPP, "beat"],
            env=_worker_metrics_env(
                TASKAPP_WORKER_METRICS_PORT=str(port),
                TASKAPP_WORKER_METRICS_HOST="127.0.0.1",
                TASKAPP_METRICS_TOKEN="scrape-token-0123456789",
            ),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        f"taskapp: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
