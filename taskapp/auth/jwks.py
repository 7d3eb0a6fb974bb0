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

from taskapp.auth.errors import (
    InvalidTokenError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
)
from taskapp.observability.metrics import JWKS_FETCHES

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

    async def aclose(self) -> None: ...


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


class IssuerMismatchError(ValueError):
    """The discovery document names another issuer than the configured one."""


class StaticKeySource:
    """A fixed key set (the dev key of `taskapp run`)."""

    def __init__(self, keys: Mapping[str, SigningKey]) -> None:
        self._keys = dict(keys)

    async def get_key(self, kid: str | None, algorithm: str) -> SigningKey:
        key = select_key(self._keys, kid, algorithm)
        if key is None:
            raise InvalidTokenError("Unknown signing key")
        return key

    async def aclose(self) -> None:
        pass


class OIDCKeySource:
    """The provider's JWKS, found through discovery and cached.

    - Discovery is read from `discovery_url` (default: the issuer's own
      `/.well-known/openid-configuration`) and must name `issuer` (else, with no keys known,
      requests get a 503 saying so); the JWKS is then read from the document's `jwks_uri`.
      Discovery is read again with the first fetch after `ttl`, so a moved `jwks_uri` is
      followed; while it cannot be read, the known `jwks_uri` is fetched all the same. A
      separate discovery URL serves providers reached over an internal address while their
      tokens carry the public one (Keycloak with `hostname-backchannel-dynamic`, whose
      `jwks_uri` follows the address asked).
    - Keys older than `ttl` are refreshed in the background while the cached ones keep
      serving, so a slow provider never slows requests down; only a cold cache waits.
    - A token naming an unknown kid forces a fetch at once (at most once per `cooldown`, so
      a flood of made-up kids cannot hammer the provider): rotations need no restart.
    - Concurrent callers share one fetch. A failed fetch keeps the keys already known and
      is not retried within `cooldown`; so does a key set without one usable signing key
      (an empty `keys` list answered with 200 must not log everybody out).
    """

    def __init__(
        self,
        issuer: str,
        http: httpx.AsyncClient,
        *,
        ttl: float,
        cooldown: float,
        discovery_url: str | None = None,
    ) -> None:
        self.issuer = issuer
        self.discovery_url = discovery_url or f"{issuer}/.well-known/openid-configuration"
        self._http = http
        self._ttl = ttl
        self._cooldown = cooldown
        self._jwks_uri: str | None = None
        self._discovered_at = float("-inf")  # when discovery was last read
        self._mismatch: str | None = None  # the last fetch's issuer mismatch, if any
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = float("-inf")  # last successful fetch
        self._failed_at = float("-inf")  # last failed fetch
        self._unknown_kid_at = float("-inf")  # last fetch forced by an unknown kid
        self._inflight: asyncio.Task[None] | None = None

    async def get_key(self, kid: str | None, algorithm: str) -> SigningKey:
        now = time.monotonic()
        waited = False
        if now - self._fetched_at > self._ttl and now - self._failed_at >= self._cooldown:
            refresh = self._start_fetch()
            if not self._keys:
                await asyncio.shield(refresh)
                waited = True
        key = select_key(self._keys, kid, algorithm)
        if key is None and not waited:
            # Wait for a fetch under way (it may bring the key); start one if allowed.
            fetch = self._inflight
            if fetch is None and time.monotonic() - self._unknown_kid_at >= self._cooldown:
                self._unknown_kid_at = time.monotonic()
                fetch = self._start_fetch()
            if fetch is not None:
                # shield: a caller that goes away does not cancel the fetch others wait for.
                await asyncio.shield(fetch)
                key = select_key(self._keys, kid, algorithm)
        if key is None:
            if not self._keys:
                if self._mismatch is not None:
                    raise ProviderMisconfiguredError(self._mismatch)
                raise ProviderUnavailableError()
            raise InvalidTokenError("Unknown signing key")
        return key

    async def aclose(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()

    def _start_fetch(self) -> asyncio.Task[None]:
        """The fetch under way, or a new one."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch_and_store())
        return self._inflight

    async def _fetch_and_store(self) -> None:
        try:
            keys = await self._fetch()
            if not keys:
                JWKS_FETCHES.labels("unusable").inc()
                self._failed_at = time.monotonic()
                logger.error(
                    "JWKS at %s holds no usable signing key; keeping %d known keys",
                    self._jwks_uri,
                    len(self._keys),
                )
                return
        except Exception as exc:  # any failure: keep serving the keys already known
            JWKS_FETCHES.labels("failed").inc()
            self._failed_at = time.monotonic()
            log = logger.error if isinstance(exc, IssuerMismatchError) else logger.warning
            log(
                "JWKS fetch via %s failed (%s); keeping %d known keys",
                self.discovery_url,
                exc,
                len(self._keys),
            )
            return
        finally:
            self._inflight = None
        JWKS_FETCHES.labels("ok").inc()
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def _fetch(self) -> dict[str, SigningKey]:
        if self._jwks_uri is None or time.monotonic() - self._discovered_at > self._ttl:
            try:
                await self._discover()
            except IssuerMismatchError:
                raise
            except Exception as exc:
                if self._jwks_uri is None:
                    raise
                # Discovery unreadable for now: the keys at the known address still count
                # (a key withdrawn there must stop working whatever discovery does).
                logger.warning("discovery via %s failed (%s)", self.discovery_url, exc)
        if self._jwks_uri is None:
            raise ValueError("no jwks_uri known")
        return parse_jwks(await self._get_json(self._jwks_uri))

    async def _discover(self) -> None:
        self._mismatch = None
        config = await self._get_json(self.discovery_url)
        named = config.get("issuer")
        if named != self.issuer:
            # The issuer Keycloak names without KC_HOSTNAME is the address it was asked at,
            # which may be internal: only the log says it, never a response.
            shown = repr(named)[:200]
            self._mismatch = (
                "The identity provider's discovery document names another issuer than "
                f"TASKAPP_OIDC_ISSUER ({self.issuer}); the API's log says which"
            )
            raise IssuerMismatchError(
                f"the discovery document names issuer {shown}, not {self.issuer!r}"
            )
        jwks_uri = config.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("discovery document has no jwks_uri")
        self._jwks_uri = jwks_uri
        self._discovered_at = time.monotonic()

    async def _get_json(self, url: str) -> Mapping[str, Any]:
        response = await self._http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, Mapping):
            raise ValueError(f"{url} did not return a JSON object")
        return document
