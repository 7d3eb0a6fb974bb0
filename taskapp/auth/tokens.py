"""Access-token verification: signature, time claims, issuer, audience, token type, roles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeGuard

import jwt

from taskapp.auth.errors import InvalidTokenError
from taskapp.auth.jwks import KEY_TYPE_FOR_ALGORITHM, KeySource
from taskapp.auth.principal import Principal

# Keycloak access tokens are 1-2 KB; anything far larger is not one of ours.
MAX_TOKEN_LENGTH = 16 * 1024
MAX_SUBJECT_LENGTH = 255


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or raises `InvalidTokenError`."""

    def __init__(self, keys: KeySource, *, issuer: str, audience: str, leeway: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidTokenError("Token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidTokenError("Malformed token") from exc
        algorithm = header.get("alg")
        if algorithm not in KEY_TYPE_FOR_ALGORITHM:
            raise InvalidTokenError("Unsupported token algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("Malformed token")
        key = await self.keys.get_key(kid, algorithm)
        try:
            claims = jwt.decode(
                token,
                key.jwk.key,
                algorithms=[algorithm],
                issuer=self.issuer,
                leeway=self.leeway,
                # Audience is checked below: Keycloak may name this API in aud or in azp.
                options={"require": ["exp", "iat", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidTokenError("Token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidTokenError("Token not yet valid") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidTokenError("Token issuer not accepted") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidTokenError("Invalid token") from exc
        return self._principal(claims)

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        audiences = claims.get("aud")
        if isinstance(audiences, str):
            audiences = [audiences]
        if not isinstance(audiences, list):
            audiences = []
        if self.audience not in audiences and claims.get("azp") != self.audience:
            raise InvalidTokenError("Token audience not accepted")
        # ID and refresh tokens carry typ "ID" / "Refresh"; only access tokens are accepted.
        if "typ" in claims and claims["typ"] != "Bearer":
            raise InvalidTokenError("Not an access token")
        subject = claims.get("sub")
        if not _usable_subject(subject):
            raise InvalidTokenError("Token subject not accepted")
        roles = _roles(claims.get("realm_access")) | _roles(
            _get(claims.get("resource_access"), self.audience)
        )
        email = claims.get("email")
        username = claims.get("preferred_username")
        return Principal(
            subject=subject,
            roles=frozenset(roles),
            email=email if isinstance(email, str) else None,
            username=username if isinstance(username, str) else None,
        )


def _usable_subject(subject: Any) -> TypeGuard[str]:
    """The subject becomes the stored owner: it must fit the column and be storable text."""
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT_LENGTH:
        return False
    if "\x00" in subject:
        return False
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" JSON escape
        return False
    return True


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None


def _roles(access: Any) -> set[str]:
    roles = _get(access, "roles")
    if not isinstance(roles, list):
        return set()
    return {role for role in roles if isinstance(role, str)}
