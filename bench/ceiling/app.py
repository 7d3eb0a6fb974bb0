"""The benchmark's independent ceiling: what a correct service must at least do for GET /tasks.

Nothing of taskapp is in it: this module imports none of taskapp's code, and `make bench` runs it
under its own uvicorn from a virtualenv of its own (`.venv-ceiling`, built from
`requirements.txt` beside this file), so a change to taskapp's stack cannot move the yardstick.

Per request it verifies the bearer token as taskapp must: RS256 only, with the realm's public
key loaded once at start; `exp`, `iat`, `iss`, `aud` and `sub` required, `iss` and `aud` exact,
30 s leeway; `typ`, when present, must be `Bearer`; and the realm roles must hold `user` or
`admin`. It then answers a fixed body: the bytes taskapp itself answered for page 1 of the same
owner, so both send as much. Configured by

    PERF_CEILING_KEY       a file with the realm's RSA public key (PEM)
    PERF_CEILING_BODY      a file with the response body
    PERF_CEILING_ISSUER    the expected `iss`
    PERF_CEILING_AUDIENCE  the expected audience
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PUBLIC_KEY = load_pem_public_key(Path(os.environ["PERF_CEILING_KEY"]).read_bytes())
BODY = Path(os.environ["PERF_CEILING_BODY"]).read_bytes()
ISSUER = os.environ["PERF_CEILING_ISSUER"]
AUDIENCE = os.environ["PERF_CEILING_AUDIENCE"]
ACCEPTED_ROLES = frozenset({"user", "admin"})
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]


def _claims(authorization: str) -> dict[str, Any] | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            PUBLIC_KEY,  # type: ignore[arg-type]
            algorithms=["RS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            leeway=30,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.InvalidTokenError:
        return None
    # ID and refresh tokens are signed by the same key; only an access token is accepted.
    return claims if claims.get("typ", "Bearer") == "Bearer" else None


async def list_tasks(request: Request) -> Response:
    claims = _claims(request.headers.get("authorization", ""))
    if claims is None:
        return JSONResponse(
            {"detail": "Not authenticated"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    realm_access = claims.get("realm_access")
    roles = realm_access.get("roles") if isinstance(realm_access, dict) else None
    if not isinstance(roles, list) or ACCEPTED_ROLES.isdisjoint(roles):
        return JSONResponse({"detail": "Forbidden"}, status_code=403)
    return Response(BODY, media_type="application/json")


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


app = Starlette(routes=[Route("/tasks", list_tasks, methods=["GET"]), Route("/healthz", healthz)])
