"""The rate limit of every request but the probes and the metrics scrape.

Callers with a valid token are limited per subject (`TASKAPP_RATE_LIMIT`); everything else,
including requests whose token fails, per client IP with a stricter limit, so floods and
token guessing are throttled before any database work. Who the caller is comes from the
authentication layer in front (taskapp.auth.middleware).

A write is counted before the app sees it. A GET or HEAD is counted by its first piece of
work: the response cache's lookup counts it in the same round trip (a cached read then costs
one round trip instead of two); a read that reaches the database first is counted just before
its first statement; one that does neither (a 401, a 422, /docs) before its response starts.
A refused read is answered 429 in every case, and never does database work.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.auth.middleware import principal_of
from taskapp.config import RateLimitSettings
from taskapp.ratelimit.check import RateLimitCheck
from taskapp.ratelimit.limiter import RateLimiter
from taskapp.redis.client import RedisBreaker

logger = logging.getLogger(__name__)

# Probes and the metrics scrape (which has its own authentication, often a static token
# that is not a JWT): monitoring must not go dark when a limit is hit.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Counted by their first Redis call or statement, or before their response: see above.
DEFERRED_METHODS = frozenset({"GET", "HEAD"})
# Where a request's count waits while it is deferred (see `pending_check`).
_PENDING = "taskapp.rate_limit_check"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def pending_check(scope: Scope) -> RateLimitCheck | None:
    """The request's count, while it is still to be made (a GET or HEAD not yet counted)."""
    check: RateLimitCheck | None = scope.get(_PENDING)
    return check if check is not None and not check.settled else None


def client_ip(scope: Scope, trusted: list[Network]) -> str:
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


def _is_trusted(address: str, trusted: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class RateLimitMiddleware:
    """Applies the limits to every route but `EXEMPT_PATHS`; adds RateLimit-* headers.

    `limiter(scope)` is the running application's limiter.
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: RateLimitSettings,
        limiter: Callable[[Scope], RateLimiter],
    ) -> None:
        self.app = app
        self.settings = settings
        self.limiter = limiter
        self.trusted = settings.trusted_networks
        self._breaker = RedisBreaker(logger, "rate limiter", retry_interval=settings.retry_interval)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.settings.enabled or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        check = self._check(scope)
        if scope["method"] in DEFERRED_METHODS and self._breaker.available():
            scope[_PENDING] = check
        else:
            await check.settle()  # a write: before its body is read
        if check.refused:
            await check.refusal().response()(scope, receive, send)
            return
        replaced = False

        async def send_checked(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the app's answer to a request refused when it was done
            if message["type"] == "http.response.start":
                await check.settle()
                if check.refused:
                    refusal = check.refusal()
                    if message["status"] != refusal.status_code:
                        replaced = True
                        await refusal.response()(scope, receive, send)
                        return
                    # The app's own answer to the refusal (a deferred check) has them.
                    MutableHeaders(scope=message).update(check.headers())
                else:
                    message["headers"] = [*message.get("headers", ()), *check.raw_headers()]
            await send(message)

        try:
            await self.app(scope, receive, send_checked)
        except Exception:
            await check.settle()  # counted even when the app failed before answering
            raise

    def _check(self, scope: Scope) -> RateLimitCheck:
        principal = principal_of(scope)
        if principal is not None:
            kind, bucket, rate = "user", _user_bucket(principal.subject), self.settings.per_user
        else:
            ip = client_ip(scope, self.trusted)
            kind, bucket, rate = "anonymous", f"ip:{ip}", self.settings.anonymous
        return RateLimitCheck(
            self.limiter(scope),
            self._breaker,
            kind=kind,
            bucket=bucket,
            rate=rate,
            fail_closed=self.settings.fail_closed,
        )


@functools.lru_cache(maxsize=65_536)
def _user_bucket(subject: str) -> str:
    return f"user:{hashlib.sha256(subject.encode()).hexdigest()[:32]}"
