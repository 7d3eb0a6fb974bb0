"""The ASGI application: lifespan-managed clients, middleware, routes and error handlers."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from sqlalchemy.ext.asyncio import AsyncEngine

from taskapp.auth.devkey import DEV_ISSUER, dev_key_source
from taskapp.auth.jwks import KeySource, OIDCKeySource
from taskapp.auth.tokens import TokenVerifier
from taskapp.body_limit import BodySizeLimitMiddleware
from taskapp.cache import ResponseCache
from taskapp.config import Settings, get_settings
from taskapp.db import RequestDatabase, check_statement_timeout, create_engine
from taskapp.errors import HEAD_TOO_LARGE, error_responses, install_error_handlers
from taskapp.notifications.celery_app import create_celery
from taskapp.notifications.outbox import Outbox
from taskapp.observability.database import instrument, probing
from taskapp.observability.exposition import router as metrics_router
from taskapp.observability.health import router as health_router
from taskapp.observability.http import HTTPMetricsMiddleware
from taskapp.observability.logging import configure_logging
from taskapp.observability.requestid import RequestIdMiddleware
from taskapp.ratelimit import (
    RateLimiter,
    RateLimitMiddleware,
    RateLimitRefusedError,
    refused_handler,
)
from taskapp.redis_client import create_redis
from taskapp.replica import ReadReplica, measuring
from taskapp.security_headers import SecurityHeadersMiddleware
from taskapp.tasks.router import router as tasks_router

logger = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """The service cannot start with the settings it was given."""


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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    http = httpx.AsyncClient(timeout=settings.oidc.http_timeout, follow_redirects=False)
    try:
        keys, issuer = _key_source(settings, http)
    except BaseException:
        await http.aclose()
        raise
    database = settings.database
    engine = create_engine(database, generic_plans=True)
    instrument(engine)
    redis = create_redis(settings.redis)
    app.state.engine = engine
    app.state.database = RequestDatabase.for_engine(engine, database)
    replica_engine = None
    app.state.replica = replica = None
    app.state.redis = redis
    app.state.cache = cache = ResponseCache(
        redis,
        settings.cache,
        key_prefix=settings.redis.key_prefix,
        track_writes=database.replica_url is not None,
    )
    measurements: list[AsyncEngine] = []
    if database.replica_url is not None:
        replica_engine = create_engine(database, generic_plans=True, url=database.replica_url)
        instrument(replica_engine)
        # The replica's measurements have connections of their own (see ReadReplica).
        measurements = [
            create_engine(database, url=url, pool_size=1, max_overflow=0)
            for url in (database.replica_url, database.url)
        ]
        app.state.replica = replica = ReadReplica(
            RequestDatabase.for_engine(replica_engine, database),
            replica=measurements[0],
            primary=measurements[1],
            clock=cache.now,
            settings=database,
        )
    app.state.rate_limiter = RateLimiter(
        redis, key_prefix=settings.redis.key_prefix, timeout=settings.ratelimit.timeout
    )
    celery = create_celery(settings) if settings.notifications.enabled else None
    app.state.outbox = outbox = Outbox(celery, enabled=settings.notifications.enabled)
    app.state.token_verifier = TokenVerifier(
        keys,
        issuer=issuer,
        audience=settings.oidc.audience,
        leeway=settings.oidc.leeway,
        cache_size=settings.oidc.claims_cache_size,
        cache_ttl=settings.oidc.claims_cache_ttl,
    )
    try:
        await check_statement_timeout(engine, database)
        async with probing(engine), measuring(replica):
            if settings.gc_freeze:
                _freeze_startup_objects()
            yield
    finally:
        await outbox.aclose()
        if celery is not None:
            celery.close()
        await cache.aclose()
        await keys.aclose()
        await http.aclose()
        await redis.aclose()
        await engine.dispose()
        for other in (replica_engine, *measurements):
            if other is not None:
                await other.dispose()


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document, plus the provider's login flow for Swagger UI when configured."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    if settings.oidc.issuer and settings.oidc.swagger_client_id:
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["oidc"] = {
            "type": "openIdConnect",
            "openIdConnectUrl": f"{settings.oidc.issuer}/.well-known/openid-configuration",
        }
        for path in schema["paths"].values():
            for operation in path.values():
                if {"bearerAuth": []} in operation.get("security", []):
                    operation["security"].append({"oidc": ["openid"]})
    app.openapi_schema = schema
    return schema


def _freeze_startup_objects() -> None:
    """Keep what exists after startup out of every later collection, and collect less often.

    A full collection otherwise walks every module, route, model and client object of the
    process: tens of milliseconds in which no request moves. Requests make mostly acyclic
    garbage, freed by reference counting; a larger first threshold suits that.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; clients are created when it starts, not at import."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, json_lines=settings.json_logs)
    swagger_oauth = None
    if settings.oidc.swagger_client_id:
        swagger_oauth = {
            "clientId": settings.oidc.swagger_client_id,
            "usePkceWithAuthorizationCodeGrant": True,
            "scopes": "openid",
        }
    app = FastAPI(
        title="taskapp",
        version="0.1.0",
        description="Multi-user task management API. Authenticate with an OIDC bearer token.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        swagger_ui_init_oauth=swagger_oauth,
        # The body cap and the server's head limit stand in front of every route, so any
        # operation may answer 413 or 431.
        responses={**error_responses(413, 500), **HEAD_TOO_LARGE},
    )
    app.state.settings = settings
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.add_exception_handler(RateLimitRefusedError, refused_handler)
    # Added last = outermost: the security headers go on every response, a 500 included;
    # the request id covers everything else; the rate limit (which
    # authenticates) comes before the body cap, so even a 413 is counted and carries the
    # RateLimit-* headers. A write is counted before any route or body parsing; a read by
    # its first Redis call, at the latest before any database work (see taskapp.ratelimit).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, settings=settings.ratelimit)
    if settings.cors_origins:
        # Outside the rate limit: a preflight is answered here, and a 401 or 429 carries
        # the CORS headers a browser needs to let the page read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            # What a client reads besides the body: its request id and its rate limit.
            expose_headers=[
                "X-Request-ID",
                "Retry-After",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
            ],
            max_age=600,
        )
    app.add_middleware(HTTPMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(tasks_router)
    return app
