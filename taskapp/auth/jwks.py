"""Signing keys: the provider's JWKS (via OIDC discovery), cached, or a fixed local key set."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import jwt

from taskapp.auth.errors import InvalidTokenError, ProviderUnavailableError

logger = logging.getLogger(__name__)

# Asymmetric algorithms only: an HS* token could be "signed" with the public key.
KEY_TYPE_FOR_ALGORITHM = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    **dict.fromkeys(("ES256", "ES384", "ES512"), "EC"),
    "EdDSA": "OKP",
}


@dataclass(frozen=True, slots=True)
class SigningKey:
    jwk: jwt.PyJWK
    # The JWK's own "alg", when it pins one.
    algorithm: str | None


class KeySource(Protocol):
    async def get_key(self, kid: str | None, algorithm: str) -> SigningKey: ...


def parse_jwks(document: Any) -> dict[str, SigningKey]:
    """Signing keys of a JWKS document by kid; encryption and unusable keys are skipped."""
    keys: dict[str, SigningKey] = {}
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in KEY_TYPE_FOR_ALGORITHM.values():
            continue
        try:
            key = jwt.PyJWK(dict(entry))
        except (jwt.PyJWTError, ValueError, TypeError):
            logger.warning("skipping unusable key %r in JWKS", entry.get("kid"))
            continue
        alg = entry.get("alg")
        keys[str(entry.get("kid", ""))] = SigningKey(key, alg if isinstance(alg, str) else None)
    return keys


def select_key(
    keys: Mapping[str, SigningKey], kid: str | None, algorithm: str
) -> SigningKey | None:
    """The key a token names, provided it fits the token's algorithm."""
    if kid is None:
        # A token without kid is acceptable only when there is no ambiguity.
        key = next(iter(keys.values())) if len(keys) == 1 else None
    else:
        key = keys.get(kid)
    if key is None:
        return None
    wrong_type = key.jwk.key_type != KEY_TYPE_FOR_ALGORITHM.get(algorithm)
    if wrong_type or (key.algorithm is not None and key.algorithm != algorithm):
        raise InvalidTokenError("Token algorithm does not match its key")
    return key


class StaticKeySource:
    """A fixed key set (the dev key of `taskapp run`)."""

    def __init__(self, keys: Mapping[str, SigningKey]) -> None:
        self._keys = dict(keys)

    async def get_key(self, kid: str | None, algorithm: str) -> SigningKey:
        key = select_key(self._keys, kid, algorithm)
        if key is None:
            raise InvalidTokenError("Unknown signing key")
        return key


class OIDCKeySource:
    """The provider's JWKS, found through discovery and cached.

    Keys are refreshed after `ttl` seconds, and at once when a token names an unknown kid
    (at most once per `cooldown`, so a flood of made-up kids cannot hammer the provider):
    a key rotation is picked up without a restart. Concurrent callers share one fetch.
    A failed fetch keeps the keys already known and is not retried within `cooldown`.
    """

    def __init__(
        self, issuer: str, http: httpx.AsyncClient, *, ttl: float, cooldown: float
    ) -> None:
        self.issuer = issuer
        self._http = http
        self._ttl = ttl
        self._cooldown = cooldown
        self._jwks_uri: str | None = None
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")  # last successful fetch
        self._failed_at = float("-inf")  # last failed fetch
        self._unknown_kid_at = float("-inf")  # last fetch forced by an unknown kid
        self._inflight: asyncio.Task[None] | None = None

    async def get_key(self, kid: str | None, algorithm: str) -> SigningKey:
        now = time.monotonic()
        if now - self._fetched_at > self._ttl and now - self._failed_at >= self._cooldown:
            await self._refresh()
        key = select_key(self._keys, kid, algorithm)
        if key is None and time.monotonic() - self._unknown_kid_at >= self._cooldown:
            self._unknown_kid_at = time.monotonic()
            await self._refresh()
            key = select_key(self._keys, kid, algorithm)
        if key is None:
            if not self._keys:
                raise ProviderUnavailableError("Identity provider keys are unavailable")
            raise InvalidTokenError("Unknown signing key")
        return key

    async def _refresh(self) -> None:
        """Fetch the keys, or wait for the fetch already under way."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_and_store())
        # shield: a caller that goes away (client disconnect) does not cancel the others' fetch.
        await asyncio.shield(self._inflight)

    async def _fetch_and_store(self) -> None:
        try:
            keys = await self._fetch()
        except (httpx.HTTPError, ValueError) as exc:
            self._failed_at = time.monotonic()
            logger.warning(
                "JWKS fetch from %s failed (%s); keeping %d known keys",
                self.issuer,
                exc,
                len(self._keys),
            )
            return
        finally:
            self._inflight = None
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, SigningKey]:
        if self._jwks_uri is None:
            config = await self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            if config.get("issuer") != self.issuer:
                raise ValueError(f"discovery document names issuer {config.get('issuer')!r}")
            jwks_uri = config.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise ValueError("discovery document has no jwks_uri")
            self._jwks_uri = jwks_uri
        return parse_jwks(await self._get_json(self._jwks_uri))

    async def _get_json(self, url: str) -> Mapping[str, Any]:
        response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, Mapping):
            raise ValueError(f"{url} did not return a JSON object")
        return document
