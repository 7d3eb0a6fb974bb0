"""Security headers on every response, so no browser sniffs, frames or runs what we send."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Nothing an API answer needs: no scripts, styles, frames or forms, and no framing of it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI loads its script and styles from a CDN and runs inline code: no policy there.
UNRESTRICTED_PATHS = ("/docs",)

_ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
_POLICY = (b"content-security-policy", API_POLICY.encode())


class SecurityHeadersMiddleware:
    """Adds `_ALWAYS` to every response, and the API's content security policy to every
    response but Swagger UI's pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = list(_ALWAYS)
        if not scope["path"].startswith(UNRESTRICTED_PATHS):
            added.append(_POLICY)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *added]
            await send(message)

        await self.app(scope, receive, send_with_headers)
