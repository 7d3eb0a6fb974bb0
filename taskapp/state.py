"""The application's typed state: every long-lived client, built when the app starts and
closed when it stops (the lifespan), never at import. Requests reach it with `state_of`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Scope

from taskapp.auth.devkey import DEV_ISSUER, dev_key_source
from taskapp.auth.jwks import KeySource, OIDCKeySource
from taskapp.auth.tokens import TokenVerifier
from taskapp.config import Settings
from taskapp.database.engine import check_statement_timeout, create_engine
from taskapp.database.replica import ReadReplica, measuring
from taskapp.database.servers import DatabaseServer
from taskapp.events.celery_app import create_celery
from taskapp.events.outbox import Outbox
from taskapp.events.registry import consumers
from taskapp.events.relay import Relay
from taskapp.observability.database import instrument, probing
from taskapp.ratelimit.limiter import RateLimiter
from taskapp.redis.cache import ResponseCache
from taskapp.redis.client import create_redis
from taskapp.redis.scripts import Scripts

# Where the state waits in the lifespan state that every request's scope carries.
_KEY = "taskapp"


class ConfigurationError(RuntimeError):
    """The service cannot start with the settings it was given."""


@dataclass(frozen=True, slots=True, kw_only=True)
class State:
    settings: Settings
    # SQLAlchemy's engine on the primary, for the probes, maintenance and scripts; requests
    # use `database`.
    engine: AsyncEngine
    database: DatabaseServer
    replica: ReadReplica | None
    redis: Redis
    scripts: Scripts
    cache: ResponseCache
    rate_limiter: RateLimiter
    outbox: Outbox
    tokens: TokenVerifier
    # The callers whose directory entry this process wrote: when (monotonic seconds), and
    # the claims it wrote (username, name, e-mail).
    directory_seen: dict[str, tuple[float, tuple[str | None, ...]]] = field(default_factory=dict)
    # The callers whose entry one of this process's requests is writing now.
    directory_writing: set[str] = field(default_factory=set)


def state_of(scope: Scope) -> State:
    """The state of the application serving the request of `scope`."""
    state: State = scope["state"][_KEY]
    return state


def lifespan_state(state: State) -> dict[str, Any]:
    """What the lifespan yields, so that every request's scope carries `state`."""
    return {_KEY: state}


def _key_source(settings: Settings, http: httpx.AsyncClient) -> tuple[KeySource, str]:
    oidc = settings.oidc
    if oidc.issuer is not None:
        source = OIDCKeySource(
            oidc.issuer,
            http,
            ttl=oidc.jwks_cache_ttl,
            cooldown=oidc.jwks_refetch_cooldown,
            discovery_url=oidc.discovery_url,
        )
        return source, oidc.issuer
    if oidc.trust_dev_key and not settings.is_production:
        return dev_key_source(settings.data_dir), DEV_ISSUER
    raise ConfigurationError(
        "TASKAPP_OIDC_ISSUER is not set: point it at your OpenID Connect provider "
        "(Keycloak: http://host:8080/realms/NAME), or use `taskapp run` for local development"
    )


@contextlib.asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[State]:
    """Every client of the application, open (and their background work running) for the
    duration of the block; all closed after it, in reverse order."""
    async with contextlib.AsyncExitStack() as stack:
        http = httpx.AsyncClient(timeout=settings.oidc.http_timeout, follow_redirects=False)
        stack.push_async_callback(http.aclose)
        keys, issuer = _key_source(settings, http)
        stack.push_async_callback(keys.aclose)
        database = settings.database
        engine = create_engine(database)
        stack.push_async_callback(engine.dispose)
        instrument(engine)
        primary = await DatabaseServer.open(database)
        stack.push_async_callback(primary.aclose)
        redis = create_redis(settings.redis)
        stack.push_async_callback(redis.aclose)
        scripts = Scripts(redis)
        stack.push_async_callback(scripts.aclose)
        cache = ResponseCache(
            redis,
            scripts,
            settings.cache,
            key_prefix=settings.redis.key_prefix,
            track_writes=database.replica_url is not None,
        )
        stack.push_async_callback(cache.aclose)
        replica = None
        if database.replica_url is not None:
            replica_server = await DatabaseServer.open(
                database, url=database.replica_url.get_secret_value()
            )
            stack.push_async_callback(replica_server.aclose)
            # The replica's measurements have connections of their own (see ReadReplica).
            measurements = [
                create_engine(database, url=url, pool_size=1, max_overflow=0)
                for url in (database.replica_url, database.url)
            ]
            for measurement in measurements:
                stack.push_async_callback(measurement.dispose)
            replica = ReadReplica(
                replica_server,
                replica=measurements[0],
                primary=measurements[1],
                clock=cache.now,
                settings=database,
            )
        enabled = consumers(settings)
        relay = None
        if enabled:
            celery = create_celery(settings)
            stack.callback(celery.close)
            relay = Relay(celery)
        outbox = Outbox(enabled, relay)
        stack.push_async_callback(outbox.aclose)
        state = State(
            settings=settings,
            engine=engine,
            database=primary,
            replica=replica,
            redis=redis,
            scripts=scripts,
            cache=cache,
            rate_limiter=RateLimiter(
                scripts, key_prefix=settings.redis.key_prefix, timeout=settings.ratelimit.timeout
            ),
            outbox=outbox,
            tokens=TokenVerifier(
                keys,
                issuer=issuer,
                audience=settings.oidc.audience,
                leeway=settings.oidc.leeway,
                cache_size=settings.oidc.claims_cache_size,
                cache_ttl=settings.oidc.claims_cache_ttl,
                accept_azp_audience=settings.oidc.accept_azp_audience,
                accept_unverified_email=settings.oidc.accept_unverified_email,
            ),
        )
        await check_statement_timeout(engine, database)
        await stack.enter_async_context(probing(engine, primary.pool))
        await stack.enter_async_context(measuring(replica))
        yield state
