"""The GCRA limiter: one atomic Lua script per count (taskapp/redis/lua/gcra.lua)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskapp.config import Rate
from taskapp.redis.scripts import Scripts, source


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until the next request would be allowed
    reset: float  # seconds until the full quota is back

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` as ASGI sends them."""
        return [(k.lower().encode(), v.encode()) for k, v in self.headers().items()]


class RateLimiter:
    def __init__(self, scripts: Scripts, *, key_prefix: str, timeout: float) -> None:
        self._script = scripts.register(source("gcra", "rate_limit"))
        self._prefix = f"{key_prefix}rl:"
        self._timeout = timeout

    def key(self, bucket: str) -> str:
        return self._prefix + bucket

    async def hit(self, bucket: str, rate: Rate) -> Decision:
        """Count one request against `bucket`; raises a Redis error when Redis fails."""
        async with asyncio.timeout(self._timeout):
            raw = await self._script(keys=[self.key(bucket)], args=gcra_arguments(rate))
        return decision(raw, rate)


def gcra_arguments(rate: Rate) -> list[float]:
    """`gcra()`'s interval (ms) and burst for `rate`."""
    return [rate.period * 1000 / rate.requests, rate.requests]


def decision(raw: Sequence[Any], rate: Rate) -> Decision:
    """The `Decision` in what `gcra()` returned."""
    allowed, remaining, retry_ms, reset_ms = raw
    return Decision(
        allowed=bool(allowed),
        limit=rate.requests,
        remaining=min(int(remaining), rate.requests - 1) if allowed else 0,
        retry_after=float(retry_ms) / 1000,
        reset=float(reset_ms) / 1000,
    )
