"""The cache of verified tokens: it saves the signature check, and never extends a token.

Verifiers here use the session provider's keys directly (no HTTP), so the only variable is
the cache; `decode_calls` counts the full signature checks (PyJWT's `jwt.decode`).
"""

from __future__ import annotations

import asyncio
import math
import time
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from pydantic import ValidationError

from taskapp.auth import tokens
from taskapp.auth.errors import InvalidTokenError
from taskapp.auth.jwks import StaticKeySource, parse_jwks
from taskapp.auth.tokens import TokenVerifier
from taskapp.config import OIDCSettings
from testing.oidc import AUDIENCE, OIDCProvider, new_rsa_key


class Counter:
    calls = 0


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts calls of `jwt.decode`, which keeps doing the real work."""
    counter = Counter()
    real_decode = jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    return counter


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Moves the cache's clocks (wall and monotonic) by `offset`; PyJWT's clock is untouched."""
    shifted = SimpleNamespace(offset=0.0)
    fake_time = SimpleNamespace(
        time=lambda: time.time() + shifted.offset,
        monotonic=lambda: time.monotonic() + shifted.offset,
    )
    monkeypatch.setattr(tokens, "time", fake_time)
    return shifted


def make_verifier(oidc: OIDCProvider, **options: Any) -> TokenVerifier:
    options = {"leeway": 30, **options}
    keys = StaticKeySource(parse_jwks(oidc.jwks()))
    return TokenVerifier(keys, issuer=oidc.issuer, audience=AUDIENCE, **options)


def tampered(token: str) -> str:
    """`token` with one character of its signature changed (well inside, so it matters)."""
    index = len(token) - 20
    replacement = "A" if token[index] != "A" else "B"
    return token[:index] + replacement + token[index + 1 :]


async def test_repeat_verification_skips_the_signature_check(
    oidc: OIDCProvider, decode_calls: Counter
) -> None:
    verifier = make_verifier(oidc)
    token = oidc.token("alice", ["user"])

    first = await verifier.verify(token)
    second = await verifier.verify(token)

    assert second == first
    assert first.subject == "alice"
    assert "user" in first.roles
    assert decode_calls.calls == 1


async def test_cached_token_is_rejected_once_expired(
    oidc: OIDCProvider, decode_calls: Counter
) -> None:
    verifier = make_verifier(oidc, leeway=0, cache_ttl=600)
    # exp is whole seconds: at least half a second of validity for the first call.
    exp = math.ceil(time.time() + 0.5)
    token = oidc.token(exp=exp)
    await verifier.verify(token)

    await asyncio.sleep(exp + 0.05 - time.time())
    with pytest.raises(InvalidTokenError, match="Token expired"):
        await verifier.verify(token)
    assert decode_calls.calls == 2


async def test_entry_lasts_until_exp_plus_leeway_and_no_longer(
    oidc: OIDCProvider, decode_calls: Counter, clock: SimpleNamespace
) -> None:
    # A long TTL, so only the token's own exp (plus leeway) can end the entry.
    verifier = make_verifier(oidc, leeway=30, cache_ttl=10_000)
    exp = int(time.time()) + 300
    token = oidc.token(exp=exp)
    await verifier.verify(token)

    clock.offset = exp + 29 - time.time()
    await verifier.verify(token)
    assert decode_calls.calls == 1, "served from the cache within the leeway"

    clock.offset = exp + 31 - time.time()
    # PyJWT, on the real clock, still accepts it: what matters is that it was asked again.
    await verifier.verify(token)
    assert decode_calls.calls == 2


async def test_entry_is_rechecked_after_the_ttl(
    oidc: OIDCProvider, decode_calls: Counter, clock: SimpleNamespace
) -> None:
    verifier = make_verifier(oidc, cache_ttl=60)
    token = oidc.token()
    await verifier.verify(token)

    clock.offset = 59
    await verifier.verify(token)
    assert decode_calls.calls == 1

    clock.offset = 61
    await verifier.verify(token)
    assert decode_calls.calls == 2
    # Re-verified: a fresh entry, good for another TTL.
    clock.offset = 61 + 59
    await verifier.verify(token)
    assert decode_calls.calls == 2


async def test_withdrawn_key_stops_being_honoured_at_once(oidc: OIDCProvider) -> None:
    verifier = make_verifier(oidc, cache_ttl=600)
    token = oidc.token()
    await verifier.verify(token)
    # The provider withdraws the key (a new JWKS without it): no grace from the cache.
    verifier.keys = StaticKeySource({})
    with pytest.raises(InvalidTokenError, match="Unknown signing key"):
        await verifier.verify(token)


async def test_refreshed_key_set_costs_one_more_check(
    oidc: OIDCProvider, decode_calls: Counter
) -> None:
    verifier = make_verifier(oidc, cache_ttl=600)
    token = oidc.token()
    await verifier.verify(token)
    # A JWKS refresh brings the same key as a new object: checked again once, then cached.
    verifier.keys = StaticKeySource(parse_jwks(oidc.jwks()))
    await verifier.verify(token)
    await verifier.verify(token)
    assert decode_calls.calls == 2


async def test_size_is_bounded_least_recently_used_goes_first(
    oidc: OIDCProvider, decode_calls: Counter
) -> None:
    verifier = make_verifier(oidc, cache_size=2)
    a, b, c = (oidc.token(sub) for sub in ("a", "b", "c"))
    for token in (a, b, c):
        await verifier.verify(token)
    assert decode_calls.calls == 3

    await verifier.verify(b)
    await verifier.verify(c)
    assert decode_calls.calls == 3, "b and c are the two kept"

    assert (await verifier.verify(a)).subject == "a"
    assert decode_calls.calls == 4, "a was evicted, so it is checked again"
    await verifier.verify(c)
    assert decode_calls.calls == 4, "storing a evicted b, the least recently used"
    await verifier.verify(b)
    assert decode_calls.calls == 5


async def test_size_zero_disables_the_cache(oidc: OIDCProvider, decode_calls: Counter) -> None:
    verifier = make_verifier(oidc, cache_size=0)
    token = oidc.token()
    for _ in range(3):
        assert (await verifier.verify(token)).subject == "alice"
    assert decode_calls.calls == 3


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("foreign key", "Invalid token"),  # fails in jwt.decode
        ("wrong audience", "Token audience not accepted"),  # fails after it
    ],
)
async def test_failed_verification_is_not_cached(
    oidc: OIDCProvider, decode_calls: Counter, case: str, message: str
) -> None:
    verifier = make_verifier(oidc)
    if case == "foreign key":
        token = oidc.token(key=new_rsa_key())
    else:
        token = oidc.token(aud=["another-api"], azp="another-client")
    for attempt in (1, 2):
        with pytest.raises(InvalidTokenError, match=message):
            await verifier.verify(token)
        assert decode_calls.calls == attempt


async def test_token_differing_by_one_character_is_not_served_from_the_cache(
    oidc: OIDCProvider, decode_calls: Counter
) -> None:
    verifier = make_verifier(oidc)
    token = oidc.token()
    await verifier.verify(token)

    with pytest.raises(InvalidTokenError, match="Invalid token"):
        await verifier.verify(tampered(token))
    assert decode_calls.calls == 2
    # The genuine token is still served from the cache.
    await verifier.verify(token)
    assert decode_calls.calls == 2


async def test_length_is_checked_before_the_cache(oidc: OIDCProvider) -> None:
    verifier = make_verifier(oidc)
    with pytest.raises(InvalidTokenError, match="Token too large"):
        await verifier.verify("x" * (tokens.MAX_TOKEN_LENGTH + 1))


async def test_app_verifies_a_token_once_across_requests(
    client: httpx.AsyncClient, oidc: OIDCProvider, decode_calls: Counter
) -> None:
    headers = oidc.auth()
    for _ in range(3):
        response = await client.get("/tasks", headers=headers)
        assert response.status_code == 200, response.text
    assert decode_calls.calls == 1


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_OIDC_CLAIMS_CACHE_SIZE", "0")
    monkeypatch.setenv("TASKAPP_OIDC_CLAIMS_CACHE_TTL", "2.5")
    settings = OIDCSettings(_env_file=None)
    assert (settings.claims_cache_size, settings.claims_cache_ttl) == (0, 2.5)


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKAPP_OIDC_CLAIMS_CACHE_SIZE", raising=False)
    monkeypatch.delenv("TASKAPP_OIDC_CLAIMS_CACHE_TTL", raising=False)
    settings = OIDCSettings(_env_file=None)
    assert (settings.claims_cache_size, settings.claims_cache_ttl) == (10_000, 300)


@pytest.mark.parametrize(
    ("name", "value"),
    [("TASKAPP_OIDC_CLAIMS_CACHE_SIZE", "-1"), ("TASKAPP_OIDC_CLAIMS_CACHE_TTL", "0")],
)
def test_out_of_range_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        OIDCSettings(_env_file=None)
