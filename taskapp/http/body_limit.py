"""A cap on request body size, enforced before anything parses the body (413 beyond it)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskapp.errors import BodyTooLargeError


class BodySizeLimitMiddleware:
    """Rejects bodies over `max_bytes`: by Content-Length up front, or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await BodyTooLargeError().response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI turns anything else raised while it reads a
                    # body into a 400. The app's handler gives it BodyTooLargeError's code.
                    error = BodyTooLargeError
                    raise HTTPException(error.status_code, error.default_detail)
            return message

        await self.app(scope, limited_receive, send)
