"""A local SMTP server that keeps every message as an .eml file (dev mode of `taskapp run`)."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class _SaveToDirectory:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        match = re.search(rb"^Message-ID:\s*<([^>]+)>", content, re.MULTILINE | re.IGNORECASE)
        name = re.sub(r"[^\w.@-]", "_", match.group(1).decode()) if match else "message"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        # Unique even for two copies of one message: a duplicate must be visible.
        (self.directory / f"{stamp}-{name}-{uuid.uuid4().hex[:8]}.eml").write_bytes(content)
        return "250 Message accepted for delivery"


def start_mail_sink(directory: Path, port: int) -> Controller:
    """Listen on 127.0.0.1:`port` and write each message to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    controller = Controller(_SaveToDirectory(directory), hostname="127.0.0.1", port=port)
    controller.start()
    return controller
