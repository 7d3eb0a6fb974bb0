"""The real processes a chaos run stops and starts: a PostgreSQL and a redis-server of its
own, a local OIDC provider, `taskapp serve` instances and nginx in front of two of them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx

from taskapp.cli.embedded import embedded_postgres
from taskapp.database.migrations import upgrade_database
from testing.oidc import OIDCProvider, serve_provider
from testing.processes import clean_env, start, wait_healthy
from testing.services import (
    PrivateRedis,
    free_port,
    private_redis,
    scratch_database,
    signal_cluster,
)


class Postgres:
    """A PostgreSQL server of the run's own (pgserver, on a Unix socket) it may stop, start
    and freeze."""

    def __init__(self, data_dir: Path, url: str) -> None:
        self.data_dir = data_dir
        self.url = url  # postgresql+asyncpg://...

    def stop(self) -> None:
        import pgserver

        pgserver.get_server(self.data_dir.resolve()).cleanup()

    def start(self) -> None:
        import pgserver

        pgserver.get_server(self.data_dir.resolve(), cleanup_mode="stop")

    def shutdown(self) -> None:
        """Stop the server for good, if it still runs (a fast shutdown): pgserver keeps a
        server running when a stop and start in this process confused its count of users."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
        deadline = time.monotonic() + 30
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def freeze(self) -> None:
        signal_cluster(self.data_dir, signal.SIGSTOP)

    def thaw(self) -> None:
        signal_cluster(self.data_dir, signal.SIGCONT)

    @property
    def dsn(self) -> str:
        """The URL for asyncpg itself."""
        return self.url.replace("postgresql+asyncpg://", "postgresql://")

    async def titles(self, prefix: str) -> dict[str, str]:
        """id -> title of every task whose title starts with `prefix`."""
        connection = await asyncpg.connect(self.dsn)
        try:
            rows = await connection.fetch(
                "SELECT id::text, title FROM tasks WHERE title LIKE $1", prefix + "%"
            )
        finally:
            await connection.close()
        return {row["id"]: row["title"] for row in rows}


@dataclass
class Stack:
    work: Path
    postgres: Postgres
    redis: PrivateRedis
    provider: OIDCProvider
    metrics_token: str
    # A second database on the same server, for the mail scenario: its workers send every
    # pending notification of their database, and the other scenarios leave thousands.
    mail_database_url: str

    def with_mail_database(self) -> Stack:
        return dataclasses.replace(
            self, postgres=Postgres(self.postgres.data_dir, self.mail_database_url)
        )

    def env(self, **extra: str) -> dict[str, str]:
        """`taskapp serve` as production runs it, with short timeouts so faults show fast."""
        prefix = f"chaos-{uuid.uuid4().hex[:8]}:"
        return clean_env(
            TASKAPP_ENV="production",
            TASKAPP_LOG_LEVEL="WARNING",
            TASKAPP_DATABASE_URL=self.postgres.url,
            TASKAPP_DATABASE_CONNECT_TIMEOUT="2",
            TASKAPP_DATABASE_POOL_TIMEOUT="2",
            TASKAPP_DATABASE_COMMAND_TIMEOUT="5",
            TASKAPP_DATABASE_STATEMENT_TIMEOUT="4",
            TASKAPP_REDIS_URL=self.redis.url,
            TASKAPP_REDIS_KEY_PREFIX=prefix,
            TASKAPP_NOTIFICATIONS_QUEUE=f"{prefix}notifications",
            TASKAPP_OIDC_ISSUER=self.provider.issuer,
            TASKAPP_METRICS_TOKEN=self.metrics_token,
            TASKAPP_RATE_LIMIT="1000000/second",
            **extra,
        )

    def tokens(self, run: str, users: int) -> list[str]:
        expires = int(time.time()) + 3600
        return [
            self.provider.token(f"chaos-{run}-{n}", exp=expires, email=f"u{n}@chaos.example")
            for n in range(users)
        ]

    async def db_up(self, base_url: str) -> float | None:
        """`db_up` as one scrape of /metrics reports it (None: no answer)."""
        headers = {"Authorization": f"Bearer {self.metrics_token}"}
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"{base_url}/metrics", headers=headers)).text
        except httpx.HTTPError:
            return None
        values = re.findall(r"^db_up(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
        return min(float(v) for v in values) if values else None


@contextlib.contextmanager
def stack(work: Path) -> Iterator[Stack]:
    with contextlib.ExitStack() as exits:
        # Registered first, so it runs last: after pgserver's own stop.
        exits.callback(Postgres(work / "postgres", "").shutdown)
        url = exits.enter_context(embedded_postgres(work / "postgres"))
        upgrade_database(url)
        admin = url.replace("postgresql+asyncpg://", "postgresql://")
        mail = exits.enter_context(scratch_database(admin, prefix="chaos_mail"))
        mail_url = mail.replace("postgresql://", "postgresql+asyncpg://", 1)
        upgrade_database(mail_url)
        redis = exits.enter_context(private_redis(work / "redis"))
        provider = exits.enter_context(contextlib.contextmanager(serve_provider)())
        yield Stack(work, Postgres(work / "postgres", url), redis, provider,
                    secrets.token_urlsafe(24), mail_url)  # fmt: skip


class Instance:
    """One `taskapp serve` on a fixed port, which may be stopped and started again."""

    def __init__(self, directory: Path, env: dict[str, str], workers: int = 2) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.workers = workers
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers)]  # fmt: skip
        self.process = start(args, self.env, self.directory)
        wait_healthy(self.process, self.port, self.directory)

    def terminate(self) -> None:
        """SIGTERM, as a process manager stops a service."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 40) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_problems(self) -> list[str]:
        text = (self.directory / "server.log").read_text(errors="replace")
        return [line for line in text.splitlines() if re.search(r"Traceback|CRITICAL", line)]


# nginx with everything it writes under a prefix directory of its own, in the foreground;
# `http` is the body of its http block.
_NGINX_MAIN = """\
worker_processes 1;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}}}
"""


def nginx_main(directory: Path, http: str) -> str:
    """The main configuration of an nginx run in `directory` (`nginx -p directory`)."""
    return _NGINX_MAIN.format(dir=directory, http=http)


NGINX_HTTP = """\
    upstream taskapp {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://taskapp;{bind}
            # The client's address appended to what it sent: the app believes the entries a
            # trusted proxy added (TASKAPP_TRUSTED_PROXIES), never the client's own.
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # Which instance answered (more than one when nginx tried another).
            add_header X-Upstream $upstream_addr always;
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            proxy_read_timeout 30s;
        }}
    }}
"""


class Nginx:
    """Debian's nginx as the proxy in front of `upstreams` (round robin); `route()` changes
    them with a graceful reload (old workers finish what they have, new ones take new
    requests). With `source_address`, nginx connects to them from that local address."""

    def __init__(
        self, directory: Path, upstreams: list[int], *, source_address: str | None = None
    ) -> None:
        executable = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(executable).exists():
            raise SystemExit("chaos: nginx not found (apt-get install nginx)")
        self.executable = executable
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.conf = directory / "nginx.conf"
        self.source_address = source_address
        self._write(upstreams)
        self.process = subprocess.Popen(  # noqa: S603 - nginx, found on PATH
            [executable, "-p", str(directory), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "stderr.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{self.base_url}/healthz", timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"chaos: nginx did not start; see {directory}") from None
                time.sleep(0.05)

    def _write(self, upstreams: list[int]) -> None:
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in upstreams)
        bind = f"\n            proxy_bind {self.source_address};" if self.source_address else ""
        self.conf.write_text(
            nginx_main(
                self.directory, NGINX_HTTP.format(servers=servers, port=self.port, bind=bind)
            )
        )

    def _workers(self) -> set[int]:
        import psutil

        return {child.pid for child in psutil.Process(self.process.pid).children()}

    async def route(self, upstreams: list[int]) -> None:
        """Send new requests to `upstreams` only; returns once no old worker is left."""
        old = self._workers()
        self._write(upstreams)
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while old & self._workers():
            if time.monotonic() > deadline:
                raise RuntimeError("nginx: old workers still running 30 s after a reload")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
