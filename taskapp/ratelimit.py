"""Rate limiting in Redis (GCRA, one atomic Lua script), shared by every process and instance.

Callers with a valid token are limited per subject (`TASKAPP_RATE_LIMIT`); everything else,
including requests whose token fails, per client IP with a stricter limit, so floods and
token guessing are throttled before any database work. The token is verified here once and
the result handed to the route's auth dependency through the request state.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.auth.dependencies import AUTH_STATE, authenticate
from taskapp.auth.principal import Principal
from taskapp.config import Rate, RateLimitSettings
from taskapp.observability.metrics import RATE_LIMIT_DECISIONS, RATE_LIMIT_ERRORS
from taskapp.redis_client import REDIS_FAILURES, RedisBreaker

logger = logging.getLogger(__name__)

# Probes and the metrics scrape (which has its own authentication, often a static token
# that is not a JWT): monitoring must not go dark when a limit is hit.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
LIMIT_EXCEEDED = "Rate limit exceeded"

# GCRA: a bucket is the "theoretical arrival time" (TAT) of the next request, in ms of the
# Redis server clock (one clock for every instance). `burst` requests may arrive at once;
# after that one every `interval` ms. Returns allowed, remaining, retry-after ms, reset ms.
_GCRA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local window = interval * burst
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
-- max(1, ...): at rates beyond a few million per second the interval vanishes in the
-- float precision of a ms timestamp; the bucket then never fills, which is right.
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"""


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


class RateLimiter:
    def __init__(self, redis: Redis, *, key_prefix: str, timeout: float) -> None:
        self._script = redis.register_script(_GCRA)
        self._prefix = f"{key_prefix}rl:"
        self._timeout = timeout

    async def hit(self, bucket: str, rate: Rate) -> Decision:
        """Count one request against `bucket`; raises a Redis error when Redis fails."""
        interval = rate.period * 1000 / rate.requests
        async with asyncio.timeout(self._timeout):
            allowed, remaining, retry_ms, reset_ms = await self._script(
                keys=[self._prefix + bucket], args=[interval, rate.requests]
            )
        return Decision(
            allowed=bool(allowed),
            limit=rate.requests,
            remaining=min(int(remaining), rate.requests - 1) if allowed else 0,
            retry_after=float(retry_ms) / 1000,
            reset=float(reset_ms) / 1000,
        )


class RedisUnavailableError(Exception):
    """The limiter is not asking Redis right now (it failed moments ago)."""


def client_ip(scope: Scope, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    untrusted address in X-Forwarded-For (the entries further left are client-controlled)."""
    peer = scope["client"][0] if scope.get("client") else "unknown"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    forwarded = Headers(scope=scope).getlist("x-forwarded-for")
    hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage: stop at the last address we could trust
        address = hop
        if not _is_trusted(hop, trusted):
            break
    return address


def _is_trusted(address: str, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _bucket(principal: Principal | None, ip: str) -> tuple[str, str]:
    if principal is not None:
        return "user", "user:" + hashlib.sha256(principal.subject.encode()).hexdigest()[:32]
    return "anonymous", f"ip:{ip}"


class RateLimitMiddleware:
    """Applies the limits to every route but the health probes; adds RateLimit-* headers."""

    def __init__(self, app: ASGIApp, settings: RateLimitSettings) -> None:
        self.app = app
        self.settings = settings
        self.trusted = settings.trusted_networks
        self._breaker = RedisBreaker(logger, "rate limiter", retry_interval=settings.retry_interval)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.enabled or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        result = await authenticate(scope["app"], Headers(scope=scope).get("authorization"))
        state[AUTH_STATE] = result
        principal = result if isinstance(result, Principal) else None
        kind, bucket = _bucket(principal, client_ip(scope, self.trusted))
        rate = self.settings.per_user if principal is not None else self.settings.anonymous
        limiter: RateLimiter = scope["app"].state.rate_limiter
        try:
            if not self._breaker.available():
                raise RedisUnavailableError("skipped: Redis failed moments ago")
            decision = await limiter.hit(bucket, rate)
        except (*REDIS_FAILURES, RedisUnavailableError) as exc:
            RATE_LIMIT_ERRORS.inc()
            if not isinstance(exc, RedisUnavailableError):
                self._breaker.failed(exc)
            if self.settings.fail_closed:
                response = JSONResponse(
                    {"detail": "Rate limiter unavailable"},
                    status_code=503,
                    headers={"Retry-After": "1"},
                )
                await response(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        RATE_LIMIT_DECISIONS.labels(kind, "allowed" if decision.allowed else "limited").inc()
        headers = decision.headers()
        if not decision.allowed:
            response = JSONResponse({"detail": LIMIT_EXCEEDED}, status_code=429, headers=headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(headers)
            await send(message)

        await self.app(scope, receive, send_with_headers)
