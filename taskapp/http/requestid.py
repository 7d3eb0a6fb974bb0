"""Request ids: accepted from `X-Request-ID` when sane, generated otherwise, always returned.

The middleware is also the last-resort error boundary, so that an unexpected error is logged
with the request id and its 500 response still carries the `X-Request-ID` header.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import secrets
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.errors import AppError

logger = logging.getLogger(__name__)

HEADER = "X-Request-ID"
_HEADER = HEADER.lower().encode()
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return _request_id.get()


class _Ids:
    """Request ids: 64 random bits per process, then a counter. Unique, not secret (a
    uuid4 each read the OS's random source on every request)."""

    def __init__(self) -> None:
        self.renew()
        # A forked child would otherwise hand out its parent's ids again.
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):016x}"


new_request_id = _Ids().next


class RequestIdMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware overhead on every request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        # A client-supplied id ends up in logs: accept only a short, plain token.
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else new_request_id()
        token = _request_id.set(request_id)
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                # A new list: the response's own stays as it was.
                message["headers"] = [*message.get("headers", ()), (_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception(
                "unhandled error in %s %s (request id %s)",
                scope["method"],
                scope["path"],
                request_id,
            )
            if response_started:
                raise  # too late for an error response; the server closes the connection
            # No internals in the body: the request id is what links it to the log line.
            await AppError().response()(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
