"""One request's count against its bucket, made once, as late as its first piece of work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskapp.config import Rate
from taskapp.errors import AppError, ServiceUnavailableError
from taskapp.observability.metrics import RATE_LIMIT_DECISIONS, RATE_LIMIT_ERRORS, Labelled
from taskapp.ratelimit.limiter import Decision, RateLimiter, decision, gcra_arguments
from taskapp.redis.client import REDIS_FAILURES, RedisBreaker

_DECISIONS = Labelled(RATE_LIMIT_DECISIONS)


class RateLimitedError(AppError):
    status_code = 429
    code = "rate_limited"
    summary = "Too many requests from this caller; retry after Retry-After seconds"
    default_detail = "Rate limit exceeded"


class RateLimiterUnavailableError(ServiceUnavailableError):
    """Redis cannot count the request and the limiter fails closed
    (TASKAPP_RATE_LIMIT_FAIL_CLOSED)."""

    code = "rate_limiter_unavailable"
    summary = "The rate limiter cannot count requests and fails closed"
    default_detail = "Rate limiter unavailable"


class RateLimitCheck:
    """One request's count against its bucket: settled at most once, by whichever comes
    first of the response cache's lookup (in the same round trip), the first database
    statement, or the start of the response. Rides on the cache's lookups as their
    `LookupRider`."""

    __slots__ = ("_breaker", "_fail_closed", "_limiter", "bucket", "decision", "failure", "kind",
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
        self.failure = False
        self.settled = False

    @property
    def refused(self) -> bool:
        if self.decision is not None:
            return not self.decision.allowed
        return self.failure and self._fail_closed

    def refusal(self) -> AppError:
        """The answer to a refused request."""
        if self.decision is not None:
            return RateLimitedError(headers=self.decision.headers())
        return RateLimiterUnavailableError()

    def headers(self) -> dict[str, str]:
        return self.decision.headers() if self.decision is not None else {}

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return self.decision.raw_headers() if self.decision is not None else []

    async def settle(self) -> None:
        """Count the request now, unless that is done already."""
        if self.settled:
            return
        if not self._breaker.available():
            self.failed(None)
            return
        try:
            decided = await self._limiter.hit(self.bucket, self.rate)
        except REDIS_FAILURES as exc:
            self.failed(exc)
            return
        self._decided(decided)

    async def enforce(self) -> None:
        """Settle, and raise the refusal if the request may not go on."""
        await self.settle()
        if self.refused:
            raise self.refusal()

    # -- as the cache's LookupRider ---------------------------------------------------------

    def gcra_call(self) -> tuple[str, Sequence[float]]:
        return self._limiter.key(self.bucket), gcra_arguments(self.rate)

    def admit(self, raw: Sequence[Any]) -> None:
        self._decided(decision(raw, self.rate))
        if self.refused:
            raise self.refusal()

    def failed(self, exc: BaseException | None) -> None:
        """Redis failed (`exc`), or was not asked because it failed moments ago (None)."""
        self.failure = self.settled = True
        RATE_LIMIT_ERRORS.inc()
        if exc is not None:
            self._breaker.failed(exc)

    def _decided(self, decided: Decision) -> None:
        self.decision = decided
        self.settled = True
        _DECISIONS(self.kind, "allowed" if decided.allowed else "limited").inc()
