"""Rate limiting in Redis (GCRA, one atomic Lua script), shared by every process and instance.

Callers with a valid token are limited per subject (`TASKAPP_RATE_LIMIT`); everything else,
including requests whose token fails, per client IP with a stricter limit, so floods and
token guessing are throttled before any database work. The token is verified here once and
the result handed to the route's auth dependency through the request state.

A write is counted before the app sees it. A GET or HEAD is counted by its first Redis
call: the response cache runs the limit in the script of its lookup, so a cached read costs
one round trip instead of two. A read that reaches the database first is counted just
before its first statement, and one that does neither (a 401, a 422, /docs) before its
response starts; a refused read is answered 429 in every case, and never does database work.
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
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.auth.dependencies import AUTH_STATE, authenticate
from taskapp.auth.principal import Principal
from taskapp.config import Rate, RateLimitSettings
from taskapp.db import BEFORE_DATABASE_WORK
from taskapp.observability.metrics import RATE_LIMIT_DECISIONS, RATE_LIMIT_ERRORS
from taskapp.redis_client import REDIS_FAILURES, RedisBreaker

logger = logging.getLogger(__name__)

# Probes and the metrics scrape (which has its own authentication, often a static token
# that is not a JWT): monitoring must not go dark when a limit is hit.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
LIMIT_EXCEEDED = "Rate limit exceeded"
# Counted by their first Redis call or statement, or before their response: see above.
DEFERRED_METHODS = frozenset({"GET", "HEAD"})
# Where a deferred check waits in the request state.
CHECK_STATE = "rate_limit_check"

# GCRA: a bucket is the "theoretical arrival time" (TAT) of the next request, in ms of the
# Redis server clock (one clock for every instance). `burst` requests may arrive at once;
# after that one every `interval` ms. Returns allowed, remaining, retry-after ms, reset ms.
GCRA_FUNCTION = """
local function gcra(key, interval, burst)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local window = interval * burst
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - window
  if allow_at > now then
    return {0, 0, allow_at - now, tat - now}
  end
  -- max(1, ...): at rates beyond a few million per second the interval vanishes in the
  -- float precision of a ms timestamp; the bucket then never fills, which is right.
  redis.call('SET', key, new_tat, 'PX', math.max(1, math.ceil(new_tat - now)))
  return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
end
"""
_GCRA = GCRA_FUNCTION + "return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))"


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


def decision(raw: list[Any], rate: Rate) -> Decision:
    """The `Decision` in what `gcra()` returned."""
    allowed, remaining, retry_ms, reset_ms = raw
    return Decision(
        allowed=bool(allowed),
        limit=rate.requests,
        remaining=min(int(remaining), rate.requests - 1) if allowed else 0,
        retry_after=float(retry_ms) / 1000,
        reset=float(reset_ms) / 1000,
    )


class RateLimitRefusedError(Exception):
    """The request is over its limit, or the limiter cannot tell and fails closed."""


class RateLimitCheck:
    """One request's count against its bucket: settled at most once, by whichever comes
    first of the cache lookup (in the same script), the first database statement, or the
    start of the response."""

    __slots__ = ("_breaker", "_fail_closed", "_limiter", "bucket", "decision", "failed", "kind",
                 "rate", "settled")  # fmt: skip

    def __init__(
        self,
        limiter: RateLimiter,
        breaker: RedisBreaker,
        *,
        kind: str,
        bucket: str,
        rate: Rate,
        fail_closed: bool,
    ) -> None:
        self._limiter = limiter
        self._breaker = breaker
        self._fail_closed = fail_closed
        self.kind = kind
        self.bucket = bucket
        self.rate = rate
        self.decision: Decision | None = None
        self.failed = False
        self.settled = False

    @property
    def key(self) -> str:
        return self._limiter.key(self.bucket)

    @property
    def refused(self) -> bool:
        if self.decision is not None:
            return not self.decision.allowed
        return self.failed and self._fail_closed

    @property
    def refusal_status(self) -> int:
        return 429 if self.decision is not None else 503

    def record(self, raw: list[Any]) -> None:
        """Take the decision from a `gcra()` result of another script (the cache lookup)."""
        self._decided(decision(raw, self.rate))

    def _decided(self, decided: Decision) -> None:
        self.decision = decided
        self.settled = True
        RATE_LIMIT_DECISIONS.labels(self.kind, "allowed" if decided.allowed else "limited").inc()

    def record_failure(self, exc: BaseException | None) -> None:
        """Redis failed (`exc`), or was not asked because it failed moments ago (None)."""
        self.failed = self.settled = True
        RATE_LIMIT_ERRORS.inc()
        if exc is not None:
            self._breaker.failed(exc)

    async def settle(self) -> None:
        """Count the request now, unless that is done already."""
        if self.settled:
            return
        if not self._breaker.available():
            self.record_failure(None)
            return
        try:
            decided = await self._limiter.hit(self.bucket, self.rate)
        except REDIS_FAILURES as exc:
            self.record_failure(exc)
            return
        self._decided(decided)

    async def enforce(self) -> None:
        """Settle, and raise `RateLimitRefusedError` if the request may not go on."""
        await self.settle()
        if self.refused:
            raise RateLimitRefusedError

    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}

    def refusal(self) -> JSONResponse:
        """The answer to a refused request."""
        if self.decision is not None:
            return JSONResponse(
                {"detail": LIMIT_EXCEEDED}, status_code=429, headers=self.decision.headers()
            )
        return JSONResponse(
            {"detail": "Rate limiter unavailable"}, status_code=503, headers={"Retry-After": "1"}
        )


def deferred_check(request: Request) -> RateLimitCheck | None:
    """The request's count, if it is still to be made (a GET or HEAD not yet counted)."""
    check = getattr(request.state, CHECK_STATE, None)
    return check if check is not None and not check.settled else None


async def refused_handler(request: Request, exc: Exception) -> Response:
    """The 429 (or fail-closed 503) of a read refused after it reached the app."""
    check: RateLimitCheck = getattr(request.state, CHECK_STATE)
    return check.refusal()


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
        check = RateLimitCheck(
            scope["app"].state.rate_limiter,
            self._breaker,
            kind=kind,
            bucket=bucket,
            rate=self.settings.per_user if principal is not None else self.settings.anonymous,
            fail_closed=self.settings.fail_closed,
        )
        if scope["method"] in DEFERRED_METHODS and self._breaker.available():
            state[CHECK_STATE] = check
            state[BEFORE_DATABASE_WORK] = check.enforce
        else:
            await check.settle()  # a write: before its body is read
        if check.refused:
            await check.refusal()(scope, receive, send)
            return
        replaced = False

        async def send_checked(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's answer to a request refused when it was done
            if message["type"] == "http.response.start":
                await check.settle()
                if check.refused and message["status"] != check.refusal_status:
                    replaced = True
                    await check.refusal()(scope, receive, send)
                    return
                MutableHeaders(scope=message).update(check.headers())
            await send(message)

        try:
            await self.app(scope, receive, send_checked)
        except Exception:
            await check.settle()  # counted even when the app failed before answering
            raise
