"""Debian's PgBouncer, in transaction pooling mode, in front of a test database."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from testing.services import Unavailable, free_port, is_listening
from testing.standby import binaries, unprivileged_user

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


@dataclass(frozen=True)
class PgBouncer:
    port: int
    database: str
    directory: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW what` on the admin console (simple query protocol only: psql)."""
        psql = shutil.which("psql") or str(binaries() / "psql")
        output = subprocess.run(
            [
                *(psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"),
                *("-d", "pgbouncer", "--no-psqlrc", "-A", "-F", "\t", "-c", f"SHOW {what}"),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
        header, rows = output[0].split("\t"), output[1:-1]  # the last line counts the rows
        return [dict(zip(header, row.split("\t"), strict=True)) for row in rows]

    def log(self) -> str:
        return (self.directory / "pgbouncer.log").read_text(errors="replace")


@contextlib.contextmanager
def pgbouncer(database_url: str, *, pool_size: int = 2, extra: str = "") -> Iterator[PgBouncer]:
    """PgBouncer on a free port, pooling `database_url`'s database over `pool_size` server
    connections at most; `extra` lines go into its [pgbouncer] section."""
    if not Path(PGBOUNCER).exists():
        raise Unavailable("needs PgBouncer (apt-get install pgbouncer)")
    target = urlsplit(database_url)
    if not target.hostname:
        raise Unavailable("PgBouncer is run against a PostgreSQL server on TCP")
    database = target.path.lstrip("/")
    user = unprivileged_user()
    directory = Path(tempfile.mkdtemp(prefix="taskapp-pgbouncer-"))
    port = free_port()
    (directory / "users.txt").write_text('"postgres" ""\n')
    config = directory / "pgbouncer.ini"
    config.write_text(
        f"""[databases]
{database} = host={target.hostname} port={target.port or 5432} dbname={database} user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory}/users.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
logfile = {directory}/pgbouncer.log
pidfile = {directory}/pgbouncer.pid
{extra}
"""
    )
    if user is not None:  # PgBouncer refuses to run as root
        for path in (directory, *directory.iterdir()):
            os.chown(path, user.pw_uid, user.pw_gid)
    process = subprocess.Popen(
        [PGBOUNCER, str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "stderr.log").open("wb"),
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not is_listening("127.0.0.1", port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "PgBouncer did not start: " + (directory / "stderr.log").read_text()
                )
            time.sleep(0.02)
        yield PgBouncer(port, database, directory)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
