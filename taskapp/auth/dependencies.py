"""FastAPI dependencies: the verified caller, and role checks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from taskapp.auth.middleware import authentication
from taskapp.auth.principal import Principal, Role
from taskapp.errors import ForbiddenError
from taskapp.http.routing import resolves_from_request

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="An OIDC access token (Keycloak) for the taskapp-api audience.",
)


async def get_principal(
    request: Request,
    # Declared for the OpenAPI security scheme; the token was verified by the
    # authentication layer (taskapp.auth.middleware).
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Principal:
    """The caller behind the request's bearer token; 401 when there is none or it is bad."""
    return request_principal(request)


def request_principal(request: Request) -> Principal:
    """The caller, as the authentication layer verified them; raises its error otherwise."""
    outcome = authentication(request.scope)
    if not isinstance(outcome, Principal):
        raise outcome
    return outcome


def ensure_role(principal: Principal, allowed: frozenset[str]) -> Principal:
    """`principal` if it holds any of `allowed`; 403 otherwise."""
    if allowed.isdisjoint(principal.roles):
        raise ForbiddenError("Insufficient role for this operation")
    return principal


USER_ROLES = frozenset({Role.USER, Role.ADMIN})


def require_role(*roles: Role) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that admits callers holding any of `roles`, and 403s the rest."""
    allowed = frozenset(roles)

    @resolves_from_request(lambda request: ensure_role(request_principal(request), allowed))
    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        return ensure_role(principal, allowed)

    return check


UserPrincipal = Annotated[Principal, Depends(require_role(*USER_ROLES))]
AdminPrincipal = Annotated[Principal, Depends(require_role(Role.ADMIN))]
