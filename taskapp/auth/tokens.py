"""Access-token verification: signature, time claims, issuer, audience, token type, roles."""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard

import jwt

from taskapp.auth.errors import InvalidTokenError, TokenExpiredError
from taskapp.auth.jwks import KEY_TYPE_FOR_ALGORITHM, KeySource, SigningKey
from taskapp.auth.principal import Principal

# Keycloak access tokens are 1-2 KB; anything far larger is not one of ours.
MAX_TOKEN_LENGTH = 16 * 1024
MAX_SUBJECT_LENGTH = 255


class _Verified(NamedTuple):
    principal: Principal
    # Where the signature was checked: the entry is good only while this key is current.
    kid: str | None
    algorithm: str
    key: SigningKey
    # Wall-clock time (the clock `exp` is read against) from which the token is expired.
    expires_at: float
    # Monotonic time from which the signature must be checked again.
    recheck_at: float


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or raises `InvalidTokenError`.

    The RSA signature check is the costly part, and a client sends the same token for
    minutes, so successful verifications are remembered (LRU of `cache_size` entries, keyed
    by the token's SHA-256; 0 turns it off). An entry is used only while the token is
    unexpired (same leeway as the full check), for at most `cache_ttl` seconds, and while
    the key source still returns the very key that checked it: a key withdrawn from the
    JWKS stops working as soon as without the cache. Failures are never remembered.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        issuer: str,
        audience: str,
        leeway: int,
        cache_size: int = 10_000,
        cache_ttl: float = 300.0,
        accept_azp_audience: bool = False,
        accept_unverified_email: bool = False,
    ) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.accept_azp_audience = accept_azp_audience
        self.accept_unverified_email = accept_unverified_email
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidTokenError("Token too large")
        if self.cache_size == 0:
            return (await self._check(token)).principal
        cache_key = hashlib.sha256(token.encode()).digest()
        # Taken out while it is judged (other requests may run meanwhile); put back, as the
        # most recently used, if it still holds.
        entry = self._cache.pop(cache_key, None)
        if entry is None or not await self._still_valid(entry):
            entry = await self._check(token)
            if time.time() >= entry.expires_at:  # exp unreadable as a number, or just passed
                return entry.principal
        self._cache[cache_key] = entry
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry.principal

    async def _still_valid(self, entry: _Verified) -> bool:
        if time.time() >= entry.expires_at or time.monotonic() >= entry.recheck_at:
            return False
        # A cheap lookup. Withdrawn key: raises as a full check would. Refreshed key set
        # (new key objects): one full check, then cached again.
        return await self.keys.get_key(entry.kid, entry.algorithm) is entry.key

    async def _check(self, token: str) -> _Verified:
        """The full verification, signature included."""
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
                # Audience is checked below (an azp-only token may be allowed).
                options={"require": ["exp", "iat", "iss", "sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpiredError() from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidTokenError("Token not yet valid") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidTokenError("Token issuer not accepted") from exc
        except jwt.MissingRequiredClaimError as exc:
            # e.g. Keycloak's lightweight access tokens (admin-cli's), which leave out `sub`
            raise InvalidTokenError(f"Token lacks the {exc.claim!r} claim") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidTokenError("Invalid token") from exc
        return _Verified(
            self._principal(claims),
            kid,
            algorithm,
            key,
            # PyJWT accepts a token while exp > now - leeway: the entry must not outlive that.
            expires_at=_expiry(claims) + self.leeway,
            recheck_at=time.monotonic() + self.cache_ttl,
        )

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        audiences = claims.get("aud")
        if isinstance(audiences, str):
            audiences = [audiences]
        if not isinstance(audiences, list):
            audiences = []
        # `azp` names the client the token was issued to, not the services it is meant for:
        # a token of our own client without our audience (Keycloak's ID token, or a client
        # whose audience mapper is missing) is not for us, unless explicitly allowed.
        if self.audience not in audiences and not (
            self.accept_azp_audience and claims.get("azp") == self.audience
        ):
            raise InvalidTokenError("Token audience not accepted")
        # ID and refresh tokens carry typ "ID" / "Refresh"; only access tokens are accepted.
        # Keycloak always sends "Bearer"; the scheme name is case-insensitive (RFC 6750).
        token_type = claims.get("typ", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise InvalidTokenError("Not an access token")
        subject = claims.get("sub")
        if not _usable_subject(subject):
            raise InvalidTokenError("Token subject not accepted")
        roles = _roles(claims.get("realm_access")) | _roles(
            _get(claims.get("resource_access"), self.audience)
        )
        email = claims.get("email")
        # Mail goes only to an address the provider has verified (by default): anyone may
        # type someone else's address into a self-service profile.
        if not isinstance(email, str) or (
            claims.get("email_verified") is not True and not self.accept_unverified_email
        ):
            email = None
        return Principal(
            subject=subject,
            roles=frozenset(roles),
            email=email,
            username=_text(claims.get("preferred_username")),
            name=_text(claims.get("name")),
        )


def _text(value: object) -> str | None:
    """A display claim as the directory stores it: text of at most 255 characters, with no
    NUL (PostgreSQL text cannot hold one); anything else is as if absent."""
    if not isinstance(value, str) or not value or "\x00" in value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return value[:255]


def _expiry(claims: Mapping[str, Any]) -> float:
    """`exp` read as PyJWT reads it (`int(...)`); -inf, never cached, if it cannot be."""
    try:
        return int(claims["exp"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return -math.inf


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
