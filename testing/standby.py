"""A private PostgreSQL primary and a real streaming standby of it (pg_basebackup -R), each on
its own TCP port, which a test may pause, stop and start.

Debian's PostgreSQL 15 binaries when installed (the production major version), else those
pgserver ships (PostgreSQL 16), so the tests run on a machine with no PostgreSQL too. The
servers run as an unprivileged OS user when the tests run as root, as PostgreSQL requires.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from testing.polling import eventually
from testing.services import free_port

DEBIAN_BINARIES = Path("/usr/lib/postgresql/15/bin")


def binaries() -> Path:
    if (DEBIAN_BINARIES / "pg_basebackup").exists():
        return DEBIAN_BINARIES
    import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


def unprivileged_user() -> pwd.struct_passwd | None:
    """The OS user the servers run as: None when the tests do not run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "pgserver"], check=True)
    return pwd.getpwnam("pgserver")


@dataclass
class Server:
    name: str
    data_dir: Path
    port: int
    work: Path
    bin: Path
    user: pwd.struct_passwd | None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str) -> None:
        """A PostgreSQL program as the server's OS user; its output goes to the log."""
        with (self.work / f"{self.name}.log").open("ab") as log:
            subprocess.run(
                [str(self.bin / args[0]), *args[1:]],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=self.user.pw_uid if self.user else None,
                group=self.user.pw_gid if self.user else None,
                cwd=self.work,
                timeout=120,
            )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.work}"
        self.run("pg_ctl", "-D", str(self.data_dir), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    async def execute(self, statement: str, *args: object) -> None:
        connection = await asyncpg.connect(self.url)
        try:
            await connection.execute(statement, *args)
        finally:
            await connection.close()

    async def fetchval(self, query: str, *args: object) -> object:
        connection = await asyncpg.connect(self.url)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()


@dataclass
class StreamingPair:
    primary: Server
    standby: Server

    async def pause_replay(self) -> None:
        """The standby keeps receiving WAL but applies none of it: it falls behind."""
        await self.standby.execute("SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        await self.standby.execute("SELECT pg_wal_replay_resume()")

    async def caught_up(self) -> None:
        """Wait (10 s at most) until the standby has replayed all the primary has written."""
        target = await self.primary.fetchval("SELECT pg_current_wal_insert_lsn()::text")

        async def replayed() -> bool:
            query = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn"
            return bool(await self.standby.fetchval(query, target))

        await eventually(replayed, f"the standby to replay up to {target}", 10, 0.02)


@contextlib.contextmanager
def streaming_pair(*, durable: bool = False) -> Iterator[StreamingPair]:
    """Start a primary, clone it with pg_basebackup, start the clone as its hot standby.
    Not `durable`: fsync off, as tests need no crash safety."""
    programs = binaries()
    user = unprivileged_user()
    work = Path(tempfile.mkdtemp(prefix="taskapp-standby-"))
    if user is not None:
        os.chown(work, user.pw_uid, user.pw_gid)
    primary = Server("primary", work / "primary", free_port(), work, programs, user)
    standby = Server("standby", work / "standby", free_port(), work, programs, user)
    try:
        primary.run("initdb", "-D", str(primary.data_dir), "-U", "postgres", "-A", "trust", "-N")
        with (primary.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("wal_level = replica\nmax_wal_senders = 4\n")
            if not durable:
                conf.write("fsync = off\n")
        primary.start()
        primary.run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"),
            *("-D", str(standby.data_dir), "-R", "-X", "stream", "-c", "fast"),
        )
        standby.start()
        yield StreamingPair(primary, standby)
    finally:
        for server in (standby, primary):
            if server.running:
                with contextlib.suppress(subprocess.SubprocessError):
                    server.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
