"""Rate limits: exact quotas, headers, per-subject and per-IP buckets, proxies, Redis faults."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from taskapp.app import create_app
from taskapp.config import Rate, RateLimitSettings
from taskapp.ratelimit.limiter import RateLimiter
from taskapp.ratelimit.middleware import client_ip
from taskapp.redis.scripts import Scripts
from testing.oidc import OIDCProvider
from testing.services import private_redis
from tests.conftest import SettingsFactory, app_state, running
from tests.fixtures.commands import sent_redis_commands
from tests.fixtures.metrics import sample
from tests.fixtures.tasks import task_queries

LIMITED = {"detail": "Rate limit exceeded", "code": "rate_limited"}


@contextlib.asynccontextmanager
async def limited_app(
    make_settings: SettingsFactory,
    *,
    peer: str = "127.0.0.1",
    redis: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    **ratelimit: Any,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(make_settings(ratelimit=ratelimit, redis=redis, cache=cache or {}))
    async with running(app, peer=(peer, 40000)) as client:
        yield app, client


def assert_limit_headers(response: httpx.Response, limit: int, remaining: int) -> None:
    # Once each, whoever answered (the app refusing a deferred check sets them too).
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "X-Request-ID"):
        assert len(response.headers.get_list(name)) == 1, name
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == str(remaining)
    assert int(response.headers["RateLimit-Reset"]) >= 0


async def test_exactly_n_requests_pass_then_429(make_settings: SettingsFactory, oidc: OIDCProvider):
    async with limited_app(make_settings, per_user="5/minute") as (_, client):
        alice = oidc.auth("alice")
        for remaining in (4, 3, 2, 1, 0):
            response = await client.get("/tasks", headers=alice)
            assert response.status_code == 200
            assert_limit_headers(response, 5, remaining)
        refused = await client.get("/tasks", headers=alice)
        assert refused.status_code == 429
        assert refused.json() == LIMITED
        assert refused.headers["Retry-After"].isdigit()
        assert 1 <= int(refused.headers["Retry-After"]) <= 12  # one request per 12 s refills
        assert_limit_headers(refused, 5, 0)
        # Writes count against the same quota, and another subject has its own.
        assert (await client.post("/tasks", json={"title": "x"}, headers=alice)).status_code == 429
        bob = await client.get("/tasks", headers=oidc.auth("bob"))
        assert bob.status_code == 200
        assert_limit_headers(bob, 5, 4)


async def test_quota_refills_continuously(make_settings: SettingsFactory, oidc: OIDCProvider):
    async with limited_app(make_settings, per_user="2/second") as (_, client):
        alice = oidc.auth("alice")
        assert [(await client.get("/tasks", headers=alice)).status_code for _ in range(3)] == [
            200,
            200,
            429,
        ]
        await asyncio.sleep(0.6)  # one request every 0.5 s
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        assert (await client.get("/tasks", headers=alice)).status_code == 429


async def test_anonymous_and_failed_auth_share_a_stricter_per_ip_bucket(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    async with limited_app(make_settings, per_user="100/minute", anonymous="3/minute") as (
        _,
        client,
    ):
        statuses = [
            (await client.get("/tasks")).status_code,
            (await client.get("/tasks", headers={"Authorization": "Bearer garbage"})).status_code,
            (await client.get("/tasks", headers=oidc.auth(exp=1))).status_code,
        ]
        assert statuses == [401, 401, 401]
        guess = await client.get("/tasks", headers={"Authorization": "Bearer another-guess"})
        assert guess.status_code == 429
        assert guess.json() == LIMITED
        assert_limit_headers(guess, 3, 0)
        # A valid token is counted per subject, not per IP.
        valid = await client.get("/tasks", headers=oidc.auth("alice"))
        assert valid.status_code == 200
        assert_limit_headers(valid, 100, 99)


async def test_health_probes_are_never_limited(make_settings: SettingsFactory):
    async with limited_app(make_settings, anonymous="1/minute") as (_, client):
        for _ in range(20):
            healthz = await client.get("/healthz")
            readyz = await client.get("/readyz")
            assert healthz.status_code == readyz.status_code == 200
            assert "RateLimit-Limit" not in healthz.headers


async def test_refused_requests_do_no_database_work(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    async with limited_app(make_settings, per_user="1/minute") as (app, client):
        alice = oidc.auth("alice")
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        with task_queries(app) as statements:
            for _ in range(5):
                refused = await client.post("/tasks", json={"title": "x"}, headers=alice)
                assert refused.status_code == 429
            assert (await client.get("/tasks", headers=oidc.auth("bob"))).status_code == 200
        assert len(statements) == 1, statements  # bob's page, and nothing of alice's


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # left part is the client's
        ("10.0.0.2", ["198.51.100.1, 10.0.0.3"], "198.51.100.1"),  # chain of trusted proxies
        ("10.0.0.2", ["198.51.100.1", "10.0.0.3"], "198.51.100.1"),  # repeated headers
        ("10.0.0.2", ["not-an-ip"], "10.0.0.2"),
        ("10.0.0.2", [], "10.0.0.2"),
        ("::1", ["2001:db8::7"], "2001:db8::7"),
    ],
)
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
    peer: str, forwarded: list[str], expected: str
):
    trusted = RateLimitSettings(_env_file=None, trusted_proxies="10.0.0.0/8, ::1").trusted_networks
    scope = {
        "type": "http",
        "client": (peer, 1234),
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }
    assert client_ip(scope, trusted) == expected


async def test_forwarded_clients_get_their_own_buckets_behind_a_trusted_proxy(
    make_settings: SettingsFactory,
):
    async with limited_app(
        make_settings, peer="10.0.0.2", anonymous="1/minute", trusted_proxies="10.0.0.0/8"
    ) as (_, client):
        first = await client.get("/tasks", headers={"X-Forwarded-For": "198.51.100.1"})
        second = await client.get("/tasks", headers={"X-Forwarded-For": "198.51.100.2"})
        again = await client.get("/tasks", headers={"X-Forwarded-For": "198.51.100.1"})
        assert [first.status_code, second.status_code, again.status_code] == [401, 401, 429]


async def test_spoofed_forwarded_for_does_not_escape_the_limit(make_settings: SettingsFactory):
    async with limited_app(make_settings, peer="203.0.113.9", anonymous="1/minute") as (_, client):
        first = await client.get("/tasks", headers={"X-Forwarded-For": "198.51.100.1"})
        second = await client.get("/tasks", headers={"X-Forwarded-For": "198.51.100.2"})
        assert [first.status_code, second.status_code] == [401, 429]


@pytest.fixture
def stopped_redis(tmp_path: Path) -> Iterator[str]:
    """The URL of a Redis server that has been stopped."""
    with private_redis(tmp_path / "redis") as server:
        server.stop()
        yield server.url


async def test_redis_down_fails_open_by_default(
    make_settings: SettingsFactory, oidc: OIDCProvider, stopped_redis: str
):
    errors = sample("taskapp_rate_limit_errors_total")
    async with limited_app(make_settings, redis={"url": stopped_redis}, per_user="1/minute") as (
        _,
        client,
    ):
        for _ in range(3):
            response = await client.get("/tasks", headers=oidc.auth("alice"))
            assert response.status_code == 200
            assert "RateLimit-Limit" not in response.headers
    assert sample("taskapp_rate_limit_errors_total") >= errors + 3


async def test_redis_down_fails_closed_when_configured(
    make_settings: SettingsFactory, oidc: OIDCProvider, stopped_redis: str
):
    async with limited_app(make_settings, redis={"url": stopped_redis}, fail_closed=True) as (
        _,
        client,
    ):
        response = await client.get("/tasks", headers=oidc.auth("alice"))
        assert response.status_code == 503
        assert response.json() == {
            "detail": "Rate limiter unavailable",
            "code": "rate_limiter_unavailable",
        }
        assert (await client.get("/healthz")).status_code == 200


async def test_limits_resume_when_redis_returns(
    make_settings: SettingsFactory, oidc: OIDCProvider, tmp_path: Path
):
    with private_redis(tmp_path / "redis") as server:
        async with limited_app(
            make_settings, redis={"url": server.url}, per_user="2/minute", retry_interval=0.2
        ) as (_, client):
            alice = oidc.auth("alice")
            server.stop()
            assert (await client.get("/tasks", headers=alice)).status_code == 200
            server.start()
            await asyncio.sleep(0.3)  # past the retry interval
            statuses = [(await client.get("/tasks", headers=alice)).status_code for _ in range(3)]
            assert statuses == [200, 200, 429]


async def test_decisions_are_counted(make_settings: SettingsFactory, oidc: OIDCProvider):
    allowed = sample("taskapp_rate_limit_decisions_total", kind="user", decision="allowed")
    limited = sample("taskapp_rate_limit_decisions_total", kind="user", decision="limited")
    async with limited_app(make_settings, per_user="1/minute") as (_, client):
        await client.get("/tasks", headers=oidc.auth("alice"))
        await client.get("/tasks", headers=oidc.auth("alice"))
    assert (
        sample("taskapp_rate_limit_decisions_total", kind="user", decision="allowed") == allowed + 1
    )
    assert (
        sample("taskapp_rate_limit_decisions_total", kind="user", decision="limited") == limited + 1
    )


async def test_openapi_documents_429(client: httpx.AsyncClient):
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        if path.startswith("/tasks"):
            for operation in operations.values():
                headers = operation["responses"]["429"]["headers"]
                assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining"} <= set(headers)


async def test_very_high_rates_work(redis_url: str):
    """A rate whose interval is below a millisecond's float precision (here 0.1 µs)."""
    limiter = RateLimiter(
        Scripts(Redis.from_url(redis_url)), key_prefix=f"test-{uuid.uuid4().hex}:", timeout=1
    )
    for _ in range(3):
        decision = await limiter.hit("user:x", Rate(10_000_000, 1))
        assert decision.allowed
        assert 0 <= decision.remaining < 10_000_000


# Reads (GET, HEAD) are counted by their first Redis call, statement or response start.


async def test_a_cached_read_is_counted_and_answered_in_one_redis_round_trip(
    make_settings: SettingsFactory, oidc: OIDCProvider, monkeypatch: pytest.MonkeyPatch
):
    async with limited_app(make_settings, per_user="10/minute") as (app, client):
        alice = oidc.auth("alice")
        assert (await client.get("/tasks", headers=alice)).status_code == 200  # fills the cache
        sent = sent_redis_commands(monkeypatch, app_state(app))
        with task_queries(app) as statements:
            response = await client.get("/tasks", headers=alice)
        assert sent == ["EVALSHA"]
        assert statements == []
        assert response.status_code == 200
        assert_limit_headers(response, 10, 8)


async def test_refused_reads_look_nothing_up_and_do_no_database_work(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    for cache in ({}, {"enabled": False}):
        async with limited_app(make_settings, per_user="1/minute", cache=cache) as (app, client):
            alice = oidc.auth("alice")
            assert (await client.get("/tasks", headers=alice)).status_code == 200
            hits = sample("taskapp_cache_requests_total", result="hit")
            with task_queries(app) as statements:
                for path in ("/tasks", f"/tasks/{uuid.uuid4()}", "/tasks?page=2"):
                    refused = await client.get(path, headers=alice)
                    assert refused.status_code == 429, (cache, path)
                    assert refused.json() == LIMITED
                    assert refused.headers["Retry-After"].isdigit()
                    assert_limit_headers(refused, 1, 0)
            assert statements == [], cache
            assert sample("taskapp_cache_requests_total", result="hit") == hits


async def test_reads_that_reach_neither_cache_nor_database_are_counted_too(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    async with limited_app(make_settings, per_user="2/minute", anonymous="1/minute") as (
        _,
        client,
    ):
        alice = oidc.auth("alice")
        for remaining in (1, 0):
            invalid = await client.get("/tasks/not-a-task-id", headers=alice)
            assert invalid.status_code == 422
            assert_limit_headers(invalid, 2, remaining)
        refused = await client.get("/tasks/not-a-task-id", headers=alice)
        assert refused.status_code == 429
        assert refused.json() == LIMITED
        # Anonymous: a 401, then the app's answer (here the OpenAPI document) is replaced.
        assert (await client.get("/tasks")).status_code == 401
        replaced = await client.get("/openapi.json")
        assert replaced.status_code == 429
        assert replaced.json() == LIMITED
        assert_limit_headers(replaced, 1, 0)


async def test_reads_fail_closed_before_the_database_when_the_cache_is_off(
    make_settings: SettingsFactory, oidc: OIDCProvider, stopped_redis: str
):
    async with limited_app(
        make_settings, redis={"url": stopped_redis}, fail_closed=True, cache={"enabled": False}
    ) as (app, client):
        with task_queries(app) as statements:
            response = await client.get("/tasks", headers=oidc.auth("alice"))
        assert response.status_code == 503
        assert response.json() == {
            "detail": "Rate limiter unavailable",
            "code": "rate_limiter_unavailable",
        }
        assert statements == []
