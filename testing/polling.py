"""Waiting for something to become true, in tests and harnesses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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
