"""JWKS handling: discovery, caching, key rotation, refetch cooldown, provider outages.

Each test starts its own app against its own provider, so neither the JWKS cache nor the
provider's keys leak between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from jwt.algorithms import RSAAlgorithm

from taskapp.app import create_app
from testing.oidc import OIDCProvider, new_rsa_key, public_jwk, serve_provider
from testing.services import free_port
from tests.conftest import SettingsFactory, running
from tests.fixtures.metrics import sample

INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token"'


@pytest.fixture(scope="module")
def served_provider() -> Iterator[OIDCProvider]:
    # One server for the module: stopping one takes half a second (its poll interval).
    yield from serve_provider()


@pytest.fixture
def provider(served_provider: OIDCProvider) -> OIDCProvider:
    """The module's provider, reset to one fresh published signing key for this test."""
    served_provider.base_url = served_provider.base_url.replace("localhost", "127.0.0.1")
    served_provider.frontend_url = ""
    served_provider.keys.clear()
    served_provider.published.clear()
    served_provider.extra_jwks = []
    served_provider.down = False
    served_provider.delay = 0
    # A slow request of an earlier test still being answered would count as this test's.
    deadline = time.monotonic() + 5
    while served_provider.active and time.monotonic() < deadline:
        time.sleep(0.01)
    served_provider.add_key()
    served_provider.jwks_fetches = 0
    served_provider.discovery_fetches = 0
    served_provider.discovery_down = False
    return served_provider


@contextlib.asynccontextmanager
async def started(
    make_settings: SettingsFactory, provider: OIDCProvider, **oidc: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """A fresh app (fresh JWKS cache) trusting `provider`, with OIDC settings `oidc`."""
    app = create_app(make_settings(oidc_={"issuer": provider.issuer, **oidc}))
    async with running(app) as client:
        yield client


async def wait_for_fetches(
    provider: OIDCProvider, count: int, client: httpx.AsyncClient, token: str
) -> None:
    """Send requests until the provider has served `count` JWKS fetches (2 s at most)."""
    deadline = time.monotonic() + 2
    while provider.jwks_fetches < count:
        assert time.monotonic() < deadline, f"only {provider.jwks_fetches} fetches"
        await client.get("/tasks", headers=bearer(token))
        await asyncio.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bogus_kid_token(provider: OIDCProvider) -> str:
    """A well-formed token naming a kid the provider never published."""
    return provider.token(kid=uuid.uuid4().hex, key=FOREIGN_KEY)


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE
    assert isinstance(response.json()["detail"], str)


def assert_issuer_mismatch(response: httpx.Response, configured: str) -> None:
    """The 503 of a provider whose discovery document names another issuer: it says so,
    without the other issuer (an internal address, as often as not)."""
    assert response.status_code == 503, response.text
    assert response.json() == {
        "detail": "The identity provider's discovery document names another issuer than "
        f"TASKAPP_OIDC_ISSUER ({configured}); the API's log says which",
        "code": "identity_provider_misconfigured",
    }
    assert response.headers["retry-after"] == "30"


def assert_provider_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {
        "detail": "Identity provider unavailable",
        "code": "identity_provider_unavailable",
    }


FOREIGN_KEY = new_rsa_key()


# --- caching -----------------------------------------------------------------------------


async def test_keys_are_fetched_once_and_cached(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(make_settings, provider) as client:
        assert provider.jwks_fetches == 0  # nothing is fetched before it is needed
        for _ in range(25):
            response = await client.get("/tasks", headers=provider.auth())
            assert response.status_code == 200, response.text
    assert provider.jwks_fetches == 1


async def test_concurrent_first_requests_share_one_fetch(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    # A cold cache under load: every caller must wait for the one fetch, not fail.
    async with started(make_settings, provider) as client:
        responses = await asyncio.gather(
            *(client.get("/tasks", headers=provider.auth()) for _ in range(20))
        )
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    assert provider.jwks_fetches == 1


# --- key rotation and the refetch cooldown -----------------------------------------------


async def test_rotated_key_triggers_one_refetch(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    # A long cooldown: it throttles only fetches forced by unknown kids, so a rotation
    # right after a regular fetch is still picked up at once.
    async with started(make_settings, provider, jwks_refetch_cooldown=60) as client:
        old_token = provider.token()
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200
        assert provider.jwks_fetches == 1

        provider.add_key()  # published and now used for signing, as Keycloak does
        new_token = provider.token()

        response = await client.get("/tasks", headers=bearer(new_token))
        assert response.status_code == 200, response.text
        assert provider.jwks_fetches == 2

        for _ in range(10):
            assert (await client.get("/tasks", headers=bearer(new_token))).status_code == 200
        # The old key is still published: tokens issued before the rotation stay valid.
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200
        assert provider.jwks_fetches == 2


async def test_rotated_key_works_at_once_without_cooldown(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(make_settings, provider, jwks_refetch_cooldown=0) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        provider.add_key()
        response = await client.get("/tasks", headers=provider.auth())
        assert response.status_code == 200, response.text
    assert provider.jwks_fetches == 2


async def test_unknown_kids_within_cooldown_do_not_hammer_the_provider(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(make_settings, provider, jwks_refetch_cooldown=60) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        fetches_before = provider.jwks_fetches

        for _ in range(30):
            assert_invalid_token(
                await client.get("/tasks", headers=bearer(bogus_kid_token(provider)))
            )
        flood = await asyncio.gather(
            *(client.get("/tasks", headers=bearer(bogus_kid_token(provider))) for _ in range(30))
        )
        for response in flood:
            assert_invalid_token(response)

        # The one refetch the first unknown kid causes; none for the rest.
        assert provider.jwks_fetches - fetches_before == 1
        # Real tokens are unaffected by the flood.
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200


async def test_unknown_kid_refetches_once_per_cooldown(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(make_settings, provider, jwks_refetch_cooldown=1.0) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        assert provider.jwks_fetches == 1
        await asyncio.sleep(1.05)

        flood = await asyncio.gather(
            *(client.get("/tasks", headers=bearer(bogus_kid_token(provider))) for _ in range(40))
        )
        for response in flood:
            assert_invalid_token(response)
        assert provider.jwks_fetches == 2


# --- cache lifetime ----------------------------------------------------------------------


async def test_keys_are_refetched_after_the_ttl(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(
        make_settings, provider, jwks_cache_ttl=0.2, jwks_refetch_cooldown=0.1
    ) as client:
        for _ in range(5):
            assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        assert provider.jwks_fetches == 1

        await asyncio.sleep(0.3)
        await wait_for_fetches(provider, 2, client, provider.token())
        await asyncio.sleep(0.05)
        assert provider.jwks_fetches == 2


async def test_stale_keys_keep_serving_while_a_slow_provider_is_refreshed(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(
        make_settings, provider, jwks_cache_ttl=0.2, jwks_refetch_cooldown=0.1, http_timeout=3
    ) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        await asyncio.sleep(0.3)
        provider.delay = 1.5  # the provider answers, but slowly
        started_at = time.monotonic()
        for _ in range(5):
            assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        assert time.monotonic() - started_at < 1.0
        provider.delay = 0


async def test_requests_naming_a_new_kid_wait_for_the_fetch_under_way(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(make_settings, provider, jwks_refetch_cooldown=60) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        provider.add_key()
        provider.delay = 0.3  # keep the refetch in flight while the others arrive
        token = provider.token()
        responses = await asyncio.gather(
            *(client.get("/tasks", headers=bearer(token)) for _ in range(10))
        )
        provider.delay = 0
        assert [r.status_code for r in responses] == [200] * 10
        assert provider.jwks_fetches == 2


async def test_key_withdrawn_by_the_provider_stops_working_after_the_ttl(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    old_kid = provider.signing_kid
    new_kid = provider.add_key()
    async with started(
        make_settings, provider, jwks_cache_ttl=0.2, jwks_refetch_cooldown=0.1
    ) as client:
        old_token = provider.token(kid=old_kid)
        new_token = provider.token(kid=new_kid)
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200

        provider.published.remove(old_kid)  # e.g. a compromised key, disabled in Keycloak
        await asyncio.sleep(0.3)

        # The first request after the TTL starts a background refresh; once it lands the
        # withdrawn key is refused.
        await wait_for_fetches(provider, 2, client, new_token)
        assert_invalid_token(await client.get("/tasks", headers=bearer(old_token)))
        assert (await client.get("/tasks", headers=bearer(new_token))).status_code == 200


async def test_discovery_is_read_again_after_the_ttl(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(
        make_settings, provider, jwks_cache_ttl=1.0, jwks_refetch_cooldown=0.1
    ) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        assert (provider.discovery_fetches, provider.jwks_fetches) == (1, 1)
        # Within the TTL a refetch (an unknown kid) reuses the jwks_uri it knows.
        assert_invalid_token(await client.get("/tasks", headers=bearer(bogus_kid_token(provider))))
        assert (provider.discovery_fetches, provider.jwks_fetches) == (1, 2)

        await asyncio.sleep(1.1)
        await wait_for_fetches(provider, 3, client, provider.token())
        assert provider.discovery_fetches == 2


async def test_a_withdrawn_key_stops_working_while_discovery_is_down(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    old_kid = provider.signing_kid
    new_kid = provider.add_key()
    async with started(
        make_settings, provider, jwks_cache_ttl=0.3, jwks_refetch_cooldown=0.1
    ) as client:
        old_token = provider.token(kid=old_kid)
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200
        provider.discovery_down = True
        provider.published.remove(old_kid)
        await asyncio.sleep(0.4)
        # Discovery fails; the JWKS at the address already known is read all the same.
        await wait_for_fetches(provider, 2, client, provider.token(kid=new_kid))
        assert provider.discovery_fetches >= 2
        assert_invalid_token(await client.get("/tasks", headers=bearer(old_token)))


async def test_a_mismatch_gone_with_the_provider_is_an_outage_again(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    configured_issuer = provider.issuer
    provider.base_url = provider.base_url.replace("127.0.0.1", "localhost")
    app = create_app(make_settings(oidc_={"issuer": configured_issuer, "jwks_refetch_cooldown": 0}))
    async with running(app) as client:
        token = provider.token(iss=configured_issuer)
        assert_issuer_mismatch(await client.get("/tasks", headers=bearer(token)), configured_issuer)
        provider.down = True
        assert_provider_unavailable(await client.get("/tasks", headers=bearer(token)))


async def test_an_empty_key_set_keeps_the_known_keys(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(
        make_settings, provider, jwks_cache_ttl=0.2, jwks_refetch_cooldown=0.1
    ) as client:
        token = provider.token()
        assert (await client.get("/tasks", headers=bearer(token))).status_code == 200
        unusable_before = jwks_fetch_count("unusable")

        # A provider mid-restart answering 200 with no keys (or none we can use).
        provider.published.clear()
        provider.extra_jwks = [{"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "x"}]
        await asyncio.sleep(0.3)
        await wait_for_fetches(provider, 2, client, token)
        for _ in range(3):
            response = await client.get("/tasks", headers=bearer(token))
            assert response.status_code == 200, response.text
        assert jwks_fetch_count("unusable") > unusable_before


def jwks_fetch_count(outcome: str) -> float:
    return sample("taskapp_jwks_fetches_total", outcome=outcome)


# --- provider outages --------------------------------------------------------------------


async def test_cached_keys_survive_a_provider_outage(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    async with started(
        make_settings, provider, jwks_cache_ttl=0.2, jwks_refetch_cooldown=0
    ) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200

        provider.down = True
        await asyncio.sleep(0.3)  # the cache is stale: each request now tries to refresh
        for _ in range(5):
            response = await client.get("/tasks", headers=provider.auth())
            assert response.status_code == 200, response.text
        # With keys known, a bad kid is the caller's fault (401), not an outage (503).
        assert_invalid_token(await client.get("/tasks", headers=bearer(bogus_kid_token(provider))))

        provider.down = False
        fetches = provider.jwks_fetches
        # The next request refreshes (in the background) from the recovered provider.
        await wait_for_fetches(provider, fetches + 1, client, provider.token())


async def test_provider_down_from_the_start_is_503(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    provider.down = True
    async with started(make_settings, provider, jwks_refetch_cooldown=0) as client:
        for method, path, body in [
            ("GET", "/tasks", None),
            ("POST", "/tasks", {"title": "x"}),
            ("GET", f"/tasks/{uuid.uuid4()}", None),
            ("PATCH", f"/tasks/{uuid.uuid4()}", {"status": "done"}),
            ("DELETE", f"/tasks/{uuid.uuid4()}", None),
        ]:
            response = await client.request(method, path, json=body, headers=provider.auth())
            assert_provider_unavailable(response)

        # A token that is malformed needs no key: still the caller's 401.
        assert_invalid_token(await client.get("/tasks", headers=bearer("a.b.c")))

        # Once the provider is back, the service recovers without a restart.
        provider.down = False
        response = await client.get("/tasks", headers=provider.auth())
        assert response.status_code == 200, response.text


async def test_metrics_with_the_provider_down_is_a_documented_503(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    # /metrics verifies tokens like /tasks, so it can answer 503 too; it was undocumented.
    provider.down = True
    async with started(make_settings, provider, jwks_refetch_cooldown=0) as client:
        assert_provider_unavailable(await client.get("/metrics", headers=provider.auth()))
        schema = (await client.get("/openapi.json")).json()
        assert "503" in schema["paths"]["/metrics"]["get"]["responses"]


async def test_unreachable_provider_is_503(make_settings: SettingsFactory) -> None:
    # Nothing listens on port 9 (discard) of loopback: connection refused.
    app = create_app(
        make_settings(oidc_={"issuer": "http://127.0.0.1:9/realms/taskapp", "http_timeout": 2})
    )
    provider = OIDCProvider(base_url="http://127.0.0.1:9")
    provider.add_key()
    async with running(app) as client:
        assert_provider_unavailable(await client.get("/tasks", headers=provider.auth()))


# --- what the JWKS may contain -----------------------------------------------------------


def encryption_jwk(key: Any, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "enc", "alg": "RSA-OAEP"})
    return jwk


@pytest.mark.parametrize("placement", ["distinct-kid", "same-kid-after", "same-kid-before"])
async def test_encryption_keys_in_the_jwks_are_ignored(
    make_settings: SettingsFactory, provider: OIDCProvider, placement: str
) -> None:
    enc_key = new_rsa_key()
    sig_kid = provider.signing_kid
    if placement == "distinct-kid":
        enc_kid = "enc-" + uuid.uuid4().hex
        provider.extra_jwks = [encryption_jwk(enc_key, enc_kid)]
    elif placement == "same-kid-after":
        enc_kid = sig_kid
        provider.extra_jwks = [encryption_jwk(enc_key, enc_kid)]
    else:
        enc_kid = sig_kid
        provider.published = []
        provider.extra_jwks = [
            encryption_jwk(enc_key, enc_kid),
            public_jwk(provider.keys[sig_kid], sig_kid),
        ]

    async with started(make_settings, provider) as client:
        response = await client.get("/tasks", headers=provider.auth())
        assert response.status_code == 200, response.text
        # A token "signed" with the encryption key is not trusted, whatever kid it names.
        forged = provider.token(kid=enc_kid, key=enc_key)
        assert_invalid_token(await client.get("/tasks", headers=bearer(forged)))


async def test_unusable_jwks_entries_are_skipped(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    secret = b"a-shared-secret-that-no-one-should-trust"
    provider.extra_jwks = [
        {"kty": "oct", "kid": "symmetric", "k": jwt.utils.base64url_encode(secret).decode()},
        {"kty": "RSA", "kid": "broken", "use": "sig", "n": "!!!", "e": "AQAB"},
        {"kty": "RSA", "kid": "no-modulus", "use": "sig"},
        {"kty": "XYZ", "kid": "unknown-type"},
        "not-an-object",  # type: ignore[list-item]
    ]
    async with started(make_settings, provider) as client:
        response = await client.get("/tasks", headers=provider.auth())
        assert response.status_code == 200, response.text

        hs256 = jwt.encode(
            provider.claims(), secret, algorithm="HS256", headers={"kid": "symmetric"}
        )
        assert_invalid_token(await client.get("/tasks", headers=bearer(hs256)))


async def test_token_without_kid_is_refused_when_keys_are_ambiguous(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    first_kid = provider.signing_kid
    provider.add_key()
    async with started(make_settings, provider) as client:
        assert (await client.get("/tasks", headers=provider.auth())).status_code == 200
        no_kid = jwt.encode(
            provider.claims(), provider.keys[first_kid], algorithm="RS256", headers={"typ": "JWT"}
        )
        assert_invalid_token(await client.get("/tasks", headers=bearer(no_kid)))


# --- discovery ---------------------------------------------------------------------------


async def test_discovery_naming_another_issuer_is_not_trusted(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    configured_issuer = provider.issuer
    # The provider now describes itself under another host name than the one configured.
    provider.base_url = provider.base_url.replace("127.0.0.1", "localhost")
    assert provider.issuer != configured_issuer

    app = create_app(make_settings(oidc_={"issuer": configured_issuer}))
    async with running(app) as client:
        for issuer in (configured_issuer, provider.issuer):
            response = await client.get("/tasks", headers=provider.auth(iss=issuer))
            assert_issuer_mismatch(response, configured_issuer)
    # Its jwks_uri was never followed.
    assert provider.jwks_fetches == 0


def closed_port_url() -> str:
    """An address where nothing listens: connecting is refused at once, no DNS involved."""
    return f"http://127.0.0.1:{free_port()}"


async def test_discovery_url_reaches_a_provider_that_names_an_unreachable_public_issuer(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    # Keycloak in a compose network: its tokens and its discovery document name the public
    # issuer (where browsers and curl reach it), which the API cannot reach; the API reads
    # discovery at the internal address, and the jwks_uri found there is internal too.
    provider.frontend_url = closed_port_url()
    discovery_url = provider.backchannel + "/.well-known/openid-configuration"

    # Without the discovery URL the public issuer is asked, and nothing answers there.
    async with started(make_settings, provider) as client:
        assert_provider_unavailable(await client.get("/tasks", headers=provider.auth()))
    assert provider.jwks_fetches == 0

    async with started(make_settings, provider, discovery_url=discovery_url) as client:
        response = await client.get("/tasks", headers=provider.auth())
        assert response.status_code == 200, response.text
        # The issuer is still the public one: a token naming the internal address is refused.
        response = await client.get("/tasks", headers=provider.auth(iss=provider.backchannel))
        assert_invalid_token(response)
        assert response.json()["detail"] == "Token issuer not accepted"
    assert provider.jwks_fetches == 1


async def test_discovery_url_describing_another_issuer_is_not_trusted(
    make_settings: SettingsFactory, provider: OIDCProvider
) -> None:
    # The document at the discovery URL names its own address, not the configured issuer.
    configured_issuer = closed_port_url() + "/realms/taskapp"
    discovery_url = provider.backchannel + "/.well-known/openid-configuration"
    settings = make_settings(oidc_={"issuer": configured_issuer, "discovery_url": discovery_url})
    async with running(create_app(settings)) as client:
        for issuer in (configured_issuer, provider.issuer):
            response = await client.get("/tasks", headers=provider.auth(iss=issuer))
            assert_issuer_mismatch(response, configured_issuer)
    assert provider.jwks_fetches == 0
