"""The ASGI application: the pipeline in order, the routers, the error handlers, and the
lifespan that opens the application's state."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.types import Scope

from taskapp.auth.middleware import AuthenticationMiddleware
from taskapp.auth.tokens import TokenVerifier
from taskapp.config import Settings, get_settings
from taskapp.errors import (
    AppError,
    BodyTooLargeError,
    HeadTooLargeError,
    describe_codes,
    error_responses,
    every_code,
    install_error_handlers,
)
from taskapp.http.body_limit import BodySizeLimitMiddleware
from taskapp.http.requestid import RequestIdMiddleware
from taskapp.http.routing import LeanRoutes, routes_of
from taskapp.http.security_headers import SecurityHeadersMiddleware
from taskapp.observability.http import HTTPMetricsMiddleware
from taskapp.observability.logging import configure_logging
from taskapp.projects.router import router as projects_router
from taskapp.ratelimit.limiter import RateLimiter
from taskapp.ratelimit.middleware import RateLimitMiddleware
from taskapp.state import lifespan_state, open_state, state_of
from taskapp.system.router import router as system_router
from taskapp.tasks.router import router as tasks_router
from taskapp.users.router import router as users_router

# Every router of the API, in the order their routes are matched.
ROUTERS = (system_router, tasks_router, projects_router, users_router)

DESCRIPTION = """Multi-user task management API. Authenticate with an OIDC bearer token.

Every error answers `{"detail": ..., "code": ...}`: `detail` says what went wrong in words,
`code` is a stable identifier to match on (a 422's `detail` lists each problem).

"""


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[Any]]:
    """The lifespan: the application's state, open while it serves."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with open_state(settings) as state:
            if settings.gc_freeze:
                _freeze_startup_objects()
            yield lifespan_state(state)

    return lifespan


def _openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The OpenAPI document: every error code in the error schema, and the provider's login
    flow for Swagger UI when configured."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    codes = schema["components"]["schemas"]["ErrorResponse"]["properties"]["code"]
    codes["enum"] = sorted(kind.code for kind in every_code() if kind.status_code != 422)
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


def _verifier(scope: Scope) -> TokenVerifier:
    return state_of(scope).tokens


def _limiter(scope: Scope) -> RateLimiter:
    return state_of(scope).rate_limiter


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
        description=DESCRIPTION + describe_codes(every_code()),
        lifespan=_lifespan(settings),
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        swagger_ui_init_oauth=swagger_oauth,
        # The body cap and the server's head limit stand in front of every route, so any
        # operation may answer 413 or 431; any may fail unexpectedly.
        responses=error_responses(BodyTooLargeError, HeadTooLargeError, AppError),
        # FastAPI's own OpenTelemetry hooks look up three global providers in the
        # environment on every request (~3 µs) to find none: taskapp ships no OpenTelemetry
        # SDK and exports Prometheus metrics of its own.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.openapi = lambda: _openapi(app, settings)  # type: ignore[method-assign]
    install_error_handlers(app)
    # Outermost first: the security headers go on every response, a 500 included; the request
    # id covers everything else; then the metrics and access log, CORS, who the caller is,
    # their rate limit (before the body cap, so even a 413 is counted and carries the
    # RateLimit-* headers), and the body cap. Starlette runs the last added first.
    # The reads the cache answers most are served without FastAPI's request machinery
    # (taskapp.http.routing); the rest, and the OpenAPI document, by FastAPI.
    app.add_middleware(LeanRoutes, routes=routes_of(*ROUTERS))
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, settings=settings.ratelimit, limiter=_limiter)
    app.add_middleware(AuthenticationMiddleware, verifier=_verifier)
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
    app.add_middleware(HTTPMetricsMiddleware, access_log=settings.logs_requests)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    for router in ROUTERS:
        app.include_router(router)
    return app
