"""The shared Redis client: one connection pool, short timeouts so Redis never stalls a request."""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from taskapp.config import RedisSettings


def create_redis(settings: RedisSettings) -> Redis:
    if settings.url is None:
        raise ValueError("TASKAPP_REDIS_URL is not set")
    return Redis.from_url(
        settings.url.get_secret_value(),
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.socket_timeout,
        health_check_interval=30,
    )


# What a Redis call can raise when Redis is down, slow or unreachable.
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


class RedisBreaker:
    """After a Redis failure, callers skip Redis for `retry_interval` seconds (so a dead or
    frozen Redis costs one timeout, not one per request), and the failure is logged at most
    once per `log_interval` seconds, with a count of the ones not logged."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        retry_interval: float,
        log_interval: float = 30.0,
    ) -> None:
        self._logger = logger
        self._what = what
        self._retry_interval = retry_interval
        self._log_interval = log_interval
        self._open_until = float("-inf")
        self._logged_at = float("-inf")
        self._suppressed = 0

    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._open_until = now + self._retry_interval
        if now - self._logged_at < self._log_interval:
            self._suppressed += 1
            return
        self._logger.warning(
            "%s: Redis unavailable (%r); %d similar failures not logged since the last report",
            self._what,
            exc,
            self._suppressed,
        )
        self._logged_at = now
        self._suppressed = 0
