"""The service's own endpoints: liveness, readiness, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel

from taskapp.auth.dependencies import USER_ROLES, ensure_role, request_principal
from taskapp.auth.errors import (
    InvalidTokenError,
    NotAuthenticatedError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
)
from taskapp.errors import ForbiddenError, error_responses
from taskapp.observability.database import probe
from taskapp.observability.scrape import is_scrape_token, scrape_registry
from taskapp.state import state_of

logger = logging.getLogger(__name__)
router = APIRouter()

PROBE_TIMEOUT = 2.0


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Literal["ok", "unavailable"]] = {}


@router.get("/healthz", response_model=Health, tags=["health"])
async def healthz() -> Health:
    """Liveness: the process is up and serving."""
    return Health(status="ok")


async def _probe(name: str, check: Awaitable[object]) -> bool:
    try:
        await asyncio.wait_for(check, PROBE_TIMEOUT)
    except Exception as exc:
        logger.warning("readiness: %s unavailable: %s", name, exc)
        return False
    return True


@router.get(
    "/readyz",
    response_model=Health,
    tags=["health"],
    responses={503: {"model": Health, "description": "The database or Redis is unreachable"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database and Redis both answer within a short timeout."""
    state = state_of(request.scope)
    # The database probe has its own timeout and keeps db_up current.
    database, redis = await asyncio.gather(
        probe(state.engine, state.database.pool), _probe("redis", state.redis.ping())
    )
    if not database:
        logger.warning("readiness: database unavailable")
    checks = {
        "database": "ok" if database else "unavailable",
        "redis": "ok" if redis else "unavailable",
    }
    healthy = database and redis
    body = Health(status="ok" if healthy else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


@router.get(
    "/metrics",
    response_class=Response,
    tags=["observability"],
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text, or OpenMetrics when the Accept header asks for it",
        },
        **error_responses(
            NotAuthenticatedError,
            InvalidTokenError,
            ForbiddenError,
            ProviderMisconfiguredError,
            ProviderUnavailableError,
        ),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (a user/admin token, or the static TASKAPP_METRICS_TOKEN)."""
    state = state_of(request.scope)
    token = state.settings.metrics_token
    if not is_scrape_token(request.headers.get("authorization", ""), token):
        ensure_role(request_principal(request), USER_ROLES)
    await probe(state.engine, state.database.pool)  # db_up as of this scrape
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(scrape_registry()), media_type=content_type)
