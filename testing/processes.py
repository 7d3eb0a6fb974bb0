"""`taskapp` as separate processes: a server started on a port, waited for until healthy,
stopped; a `taskapp worker` or `taskapp beat`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

TASKAPP = str(Path(sys.executable).with_name("taskapp"))


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any TASKAPP_* setting, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKAPP_")}
    env.update(values)
    return env


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """`taskapp *args` in its own process group, logging to cwd/server.log."""
    with (cwd / "server.log").open("wb") as log:
        return subprocess.Popen(
            [TASKAPP, *args],
            start_new_session=True,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_healthy(process: subprocess.Popen[bytes], port: int, cwd: Path) -> None:
    log = cwd / "server.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy:\n" + log.read_text())


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a person would; killed if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def running_server(
    args: list[str], env: dict[str, str], port: int, cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`taskapp *args --port port`, healthy, for the duration of the block."""
    process = start([*args, "--port", str(port)], env, cwd)
    try:
        wait_healthy(process, port, cwd)
        yield process
    finally:
        stop(process)


class Worker:
    """One `taskapp worker` (with its embedded beat), or `taskapp beat` (`command`), in a
    process group of its own."""

    def __init__(
        self, args: list[str], env: dict[str, str], directory: Path, command: str = "worker"
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / f"{command}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [TASKAPP, command, *args],
                start_new_session=True,
                env={**env, "TASKAPP_DATA_DIR": str(directory)},
                cwd=directory,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until Celery says the worker consumes (its log line `celery@host ready.`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "worker exited:\n" + self.output()
            if " ready." in self.output():
                return
            time.sleep(0.05)
        raise AssertionError("worker did not become ready:\n" + self.output())

    def kill(self) -> None:
        """SIGKILL the whole group (worker, pool processes, beat): a crash, no shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Celery's warm shutdown, then whatever is left of the group is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.kill()
