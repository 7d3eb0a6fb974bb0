"""Authentication is one layer: each request's token is verified once, in front of the rate
limit and the routes, which read the outcome instead of verifying again."""

from __future__ import annotations

from typing import Any

import pytest

from taskapp.app import create_app
from taskapp.auth.middleware import authentication, principal_of
from taskapp.auth.principal import Principal
from taskapp.auth.tokens import TokenVerifier
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, running


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks"), ("POST", "/tasks"), ("GET", "/tasks/{id}"), ("GET", "/metrics")],
)
async def test_each_request_verifies_its_token_once(
    make_settings: SettingsFactory,
    oidc: OIDCProvider,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
) -> None:
    # No claims cache, and a real rate limit: every layer that wanted the caller would
    # have to verify the token again.
    app = create_app(
        make_settings(oidc_={"claims_cache_size": 0}, ratelimit={"per_user": "100/second"})
    )
    async with running(app) as client:
        created = await client.post("/tasks", json={"title": "x"}, headers=oidc.auth("alice"))
        task_id = created.json()["id"]
        checks: list[str] = []
        original = TokenVerifier.verify

        async def counted(self: TokenVerifier, token: str) -> Principal:
            checks.append(token)
            return await original(self, token)

        monkeypatch.setattr(TokenVerifier, "verify", counted)
        kwargs: dict[str, Any] = {"json": {"title": "y"}} if method == "POST" else {}
        response = await client.request(
            method, path.replace("{id}", task_id), headers=oidc.auth("alice"), **kwargs
        )
    assert response.status_code in {200, 201}, response.text
    assert len(checks) == 1


async def test_the_rate_limit_counts_the_caller_the_layer_verified(
    make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    """Alice's budget is hers: a request with a bad token is counted per address, not as
    hers, and hers is not spent by Bob's."""
    app = create_app(make_settings(ratelimit={"per_user": "2/minute", "anonymous": "5/minute"}))
    async with running(app) as client:
        alice, bob = oidc.auth("alice"), oidc.auth("bob")
        bad = {"Authorization": "Bearer not-a-token"}
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        assert (await client.get("/tasks", headers=bad)).headers["RateLimit-Limit"] == "5"
        assert (await client.get("/tasks", headers=bob)).status_code == 200
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        refused = await client.get("/tasks", headers=alice)
    assert refused.status_code == 429
    assert refused.json()["code"] == "rate_limited"


def test_the_outcome_is_read_from_the_scope_the_layer_filled() -> None:
    with pytest.raises(RuntimeError, match="AuthenticationMiddleware"):
        authentication({"type": "http"})
    assert principal_of({"type": "http"}) is None
