"""FastAPI dependencies: the verified caller, and role checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from taskapp.auth.errors import InvalidTokenError
from taskapp.auth.principal import Principal, Role
from taskapp.auth.tokens import TokenVerifier
from taskapp.errors import ForbiddenError

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An OIDC access token (Keycloak) for the taskapp-api audience.",
)


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """The caller behind the request's bearer token; 401 when there is none or it is bad."""
    if credentials is None:
        # "Bearer" with nothing after it is a malformed token, not a missing one.
        scheme = request.headers.get("Authorization", "").strip().partition(" ")[0]
        if scheme.lower() == "bearer":
            raise InvalidTokenError("Malformed token")
        raise InvalidTokenError("Not authenticated", missing=True)
    verifier: TokenVerifier = request.app.state.token_verifier
    return await verifier.verify(credentials.credentials)


def require_role(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits callers holding any of `roles`, and 403s the rest."""
    allowed = frozenset(roles)

    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if allowed.isdisjoint(principal.roles):
            raise ForbiddenError("Insufficient role for this operation")
        return principal

    return check


UserPrincipal = Annotated[Principal, Depends(require_role(Role.USER, Role.ADMIN))]
AdminPrincipal = Annotated[Principal, Depends(require_role(Role.ADMIN))]
