"""FastAPI dependencies: the verified caller, and role checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from taskapp.auth.errors import InvalidTokenError, ProviderUnavailableError
from taskapp.auth.principal import Principal, Role
from taskapp.auth.tokens import TokenVerifier
from taskapp.errors import ForbiddenError

AuthError = InvalidTokenError | ProviderUnavailableError

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An OIDC access token (Keycloak) for the taskapp-api audience.",
)


# Where the rate limiter leaves the verification result for the route's dependency.
AUTH_STATE = "auth_result"


async def authenticate(app: Any, authorization: str | None) -> Principal | AuthError:
    """Verify an Authorization header value: the caller, or the error to answer with."""
    try:
        return await _verify(app, authorization)
    except (InvalidTokenError, ProviderUnavailableError) as exc:
        return exc


async def _verify(app: Any, authorization: str | None) -> Principal:
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        # RFC 6750: a request with no bearer credentials gets a challenge without an error.
        raise InvalidTokenError("Not authenticated", missing=True)
    if not token.strip():
        raise InvalidTokenError("Malformed token")
    verifier: TokenVerifier = app.state.token_verifier
    return await verifier.verify(token.strip())


async def get_principal(
    request: Request,
    # Declared for the OpenAPI security scheme; the header is parsed by `authenticate`.
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """The caller behind the request's bearer token; 401 when there is none or it is bad."""
    return await request_principal(request)


async def request_principal(request: Request) -> Principal:
    """The caller, as verified by the rate limiter for this request or verified now."""
    result = getattr(request.state, AUTH_STATE, None)
    if result is None:
        result = await authenticate(request.app, request.headers.get("authorization"))
    if not isinstance(result, Principal):
        raise result
    return result


def ensure_role(principal: Principal, allowed: frozenset[str]) -> Principal:
    """`principal` if it holds any of `allowed`; 403 otherwise."""
    if allowed.isdisjoint(principal.roles):
        raise ForbiddenError("Insufficient role for this operation")
    return principal


USER_ROLES = frozenset({Role.USER, Role.ADMIN})


def require_role(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits callers holding any of `roles`, and 403s the rest."""
    allowed = frozenset(roles)

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return ensure_role(principal, allowed)

    return check


UserPrincipal = Annotated[Principal, Depends(require_role(*USER_ROLES))]
AdminPrincipal = Annotated[Principal, Depends(require_role(Role.ADMIN))]
