"""The moving parts of the delivery tests: an SMTP server that records what it accepts,
`taskapp worker` processes, and polling helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from tests.fixtures.processes import TASKAPP
from tests.fixtures.services import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None, self.message.as_string()
        return str(body.get_content())

    @property
    def html(self) -> str:
        body = self.message.get_body(("html",))
        assert body is not None, self.message.as_string()
        return str(body.get_content())


@dataclass
class Mailbox:
    """aiosmtpd handler: records each accepted message; can delay or refuse."""

    messages: list[Received] = field(default_factory=list)
    # e.g. "550 5.1.1 No such user": every RCPT TO gets this answer
    rcpt_reply: str | None = None
    # e.g. "451 4.3.0 Try again later": every DATA gets this answer (nothing is accepted)
    data_reply: str | None = None
    # seconds DATA takes before its answer (a slow mail server)
    delay: float = 0.0
    rcpt_attempts: int = 0
    data_attempts: int = 0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpt_attempts += 1
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.data_attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.data_reply is not None:
            return self.data_reply
        content: bytes = envelope.original_content or envelope.content
        message = message_from_bytes(content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


class MailServer:
    """A real SMTP server on a fixed free port, started (and stopped) when a test says so."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"smtp://127.0.0.1:{self.port}"
        self.mailbox = Mailbox()
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[Received]:
        return self.mailbox.messages

    def start(self) -> None:
        assert self._controller is None
        controller = Controller(self.mailbox, hostname="127.0.0.1", port=self.port)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


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


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, within: float = 15, interval: float = 0.1
) -> float:
    """Poll `check` until it holds; the seconds that took. Fails with `what` on timeout."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start
