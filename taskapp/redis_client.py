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


class FailureLog:
    """Logs a recurring failure at most once per `interval` seconds, with a count."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = 30.0) -> None:
        self._logger = logger
        self._what = what
        self._interval = interval
        self._last = float("-inf")
        self._suppressed = 0

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        self._logger.warning(
            "%s: Redis unavailable (%r); %d similar failures not logged since the last report",
            self._what,
            exc,
            self._suppressed,
        )
        self._last = now
        self._suppressed = 0
