"""Liveness and readiness probes; no authentication, no database work beyond a ping."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from taskapp.observability.database import probe

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

PROBE_TIMEOUT = 2.0


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Literal["ok", "unavailable"]] = {}


@router.get("/healthz", response_model=Health)
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
    responses={503: {"model": Health, "description": "The database or Redis is unreachable"}},
)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database and Redis both answer within a short timeout."""
    # The database probe has its own timeout and keeps db_up current.
    database, redis = await asyncio.gather(
        probe(request.app.state.engine),
        _probe("redis", request.app.state.redis.ping()),
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
