"""GET /metrics: Prometheus text (or OpenMetrics when asked), totals over all workers."""

from __future__ import annotations

import contextlib
import hmac
import os
from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from taskapp.auth.dependencies import USER_ROLES, ensure_role, request_principal
from taskapp.config import Settings
from taskapp.errors import error_responses
from taskapp.observability.database import probe

router = APIRouter(tags=["observability"])

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def forget_dead_processes(directory: str) -> None:
    """Drop the live-gauge files of worker processes that died (uvicorn restarts a crashed
    worker without telling prometheus_client), so `live*` gauges count living ones only."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            # Concurrent scrapes in other workers may remove the same file first.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except PermissionError:
            pass


def _registry() -> CollectorRegistry:
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return REGISTRY
    forget_dead_processes(directory)
    # Every worker writes its samples to the shared directory; this sums them up. The
    # process, GC and platform collectors describe the process answering the scrape.
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


async def _authorize(request: Request) -> None:
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.strip().partition(" ")
    token = settings.metrics_token
    if (
        token is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(credentials.strip().encode(), token.get_secret_value().encode())
    ):
        return  # the static scrape token
    ensure_role(await request_principal(request), USER_ROLES)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text, or OpenMetrics when the Accept header asks for it",
        },
        # 503: a token's keys cannot be fetched from the identity provider.
        **error_responses(401, 403, 429, 503),
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (a user/admin token, or the static TASKAPP_METRICS_TOKEN)."""
    await _authorize(request)
    await probe(request.app.state.engine)  # db_up as of this scrape
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(_registry()), media_type=content_type)
