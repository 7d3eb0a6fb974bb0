"""GET /metrics: Prometheus text (or OpenMetrics when asked), totals over all workers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import choose_encoder

from taskapp.auth.dependencies import USER_ROLES, ensure_role, request_principal
from taskapp.config import Settings
from taskapp.errors import error_responses
from taskapp.observability.database import probe
from taskapp.observability.scrape import is_scrape_token, scrape_registry

router = APIRouter(tags=["observability"])


async def _authorize(request: Request) -> None:
    settings: Settings = request.app.state.settings
    if is_scrape_token(request.headers.get("authorization", ""), settings.metrics_token):
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
    return Response(encoder(scrape_registry()), media_type=content_type)
