"""Per-request metrics and the access log line, keyed by route template (never raw paths)."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.auth.middleware import principal_of
from taskapp.observability.metrics import HTTP_REQUEST_DURATION, HTTP_REQUESTS, Labelled

access_log = logging.getLogger("taskapp.access")
_REQUESTS = Labelled(HTTP_REQUESTS)
_DURATION = Labelled(HTTP_REQUEST_DURATION)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HTTPMetricsMiddleware:
    """Counts and times every request by route; with `access_log`, also logs a line each."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception became the 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            duration = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            _REQUESTS(method, route, str(status)).inc()
            _DURATION(method, route).observe(duration)
            if self.access_log:
                access_log.info(
                    "%s %s %s %.1fms",
                    method,
                    route,
                    status,
                    duration * 1000,
                    extra={
                        "method": method,
                        "route": route,
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round(duration * 1000, 2),
                        "subject": _subject(scope),
                    },
                )


def _subject(scope: Scope) -> str | None:
    principal = principal_of(scope)
    return principal.subject if principal is not None else None
