"""Authentication, as one layer of the pipeline: the bearer token of a request is verified
here, once, and everything after (the rate limit, the routes, the access log) reads the
outcome with `authentication` or `principal_of`."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from taskapp.auth.errors import (
    InvalidTokenError,
    NotAuthenticatedError,
    ProviderUnavailableError,
)
from taskapp.auth.principal import Principal
from taskapp.auth.tokens import TokenVerifier

# Who the caller is, or why that could not be told.
Authentication = Principal | InvalidTokenError | ProviderUnavailableError
# Where the outcome waits in the request's scope.
_OUTCOME = "taskapp.authentication"


async def authenticate(verifier: TokenVerifier, authorization: str | None) -> Authentication:
    """The caller named by an Authorization header value, or the error to answer with."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    try:
        if scheme.lower() != "bearer":
            # RFC 6750: a request with no bearer credentials gets a challenge without an error.
            raise NotAuthenticatedError()
        if not token.strip():
            raise InvalidTokenError("Malformed token")
        return await verifier.verify(token.strip())
    except (InvalidTokenError, ProviderUnavailableError) as exc:
        return exc


def authentication(scope: Scope) -> Authentication:
    """The outcome of the request's authentication."""
    try:
        outcome: Authentication = scope[_OUTCOME]
    except KeyError:
        raise RuntimeError("the request did not pass AuthenticationMiddleware") from None
    return outcome


def principal_of(scope: Scope) -> Principal | None:
    """The verified caller, if the request has one."""
    outcome = scope.get(_OUTCOME)
    return outcome if isinstance(outcome, Principal) else None


class AuthenticationMiddleware:
    """Verifies each HTTP request's bearer token with `verifier(scope)`, the running
    application's verifier, and leaves the outcome in the scope."""

    def __init__(self, app: ASGIApp, verifier: Callable[[Scope], TokenVerifier]) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            scope[_OUTCOME] = await authenticate(self.verifier(scope), authorization)
        await self.app(scope, receive, send)
