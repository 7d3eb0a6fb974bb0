"""The shared Redis client: one connection pool, short timeouts so Redis never stalls a request."""

from __future__ import annotations

from redis.asyncio import Redis

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
