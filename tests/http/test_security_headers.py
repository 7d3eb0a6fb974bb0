"""Security headers on every response; CORS only for configured origins; docs switchable."""

from __future__ import annotations

import uuid

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from taskapp.app import create_app
from taskapp.config import Settings
from taskapp.http.security_headers import API_POLICY
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, running

ORIGIN = "https://tasks.example.com"


def assert_protected(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff", response
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"] == API_POLICY
    assert "default-src 'none'" in API_POLICY


async def test_every_kind_of_answer_carries_the_headers(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    app = create_app(make_settings(max_body_bytes=1024))

    async def fail() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/test-failure", fail)
    alice = oidc.auth("alice")
    admin = oidc.auth("root", roles=["admin"])
    async with running(app) as client:
        created = await client.post("/tasks", json={"title": "x"}, headers=alice)
        task = f"/tasks/{created.json()['id']}"
        answers = [
            (201, created),
            (200, await client.get(task, headers=alice)),
            (204, await client.delete(task, headers=admin)),
            (401, await client.get("/tasks")),
            (403, await client.delete(f"/tasks/{uuid.uuid4()}", headers=alice)),
            (404, await client.get(f"/tasks/{uuid.uuid4()}", headers=alice)),
            (413, await client.post("/tasks", content=b"x" * 4096, headers=alice)),
            (422, await client.post("/tasks", json={"title": ""}, headers=alice)),
            (500, await client.get("/test-failure")),
            (200, await client.get("/healthz")),
            (200, await client.get("/openapi.json")),
        ]
    for status, response in answers:
        assert response.status_code == status, (status, response.request.url, response.text)
        assert_protected(response)


async def test_swagger_ui_has_no_policy_but_the_rest(client: httpx.AsyncClient):
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "content-security-policy" not in docs.headers  # it runs inline code from a CDN
    assert docs.headers["x-content-type-options"] == "nosniff"


async def test_no_cors_headers_unless_configured(client: httpx.AsyncClient, oidc: OIDCProvider):
    preflight = await client.options(
        "/tasks",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    response = await client.get("/tasks", headers={"Origin": ORIGIN, **oidc.auth()})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


@pytest.fixture
async def cors_client(make_settings: SettingsFactory):
    app = create_app(make_settings(cors_origins=[ORIGIN]))
    async with running(app) as client:
        yield client


async def test_allowed_origin_may_call_and_read_errors(
    cors_client: httpx.AsyncClient, oidc: OIDCProvider
):
    preflight = await cors_client.options(
        "/tasks",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers  # bearer tokens only

    created = await cors_client.post(
        "/tasks", json={"title": "x"}, headers={"Origin": ORIGIN, **oidc.auth()}
    )
    assert created.status_code == 201
    assert created.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in created.headers["access-control-expose-headers"].lower()

    refused = await cors_client.get("/tasks", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN


async def test_other_origins_are_not_allowed(cors_client: httpx.AsyncClient, oidc: OIDCProvider):
    other = "https://evil.example.net"
    preflight = await cors_client.options(
        "/tasks", headers={"Origin": other, "Access-Control-Request-Method": "DELETE"}
    )
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    response = await cors_client.get("/tasks", headers={"Origin": other, **oidc.auth()})
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    ("value", "origins"),
    [
        ("https://a.example.com", ["https://a.example.com"]),
        (
            " https://a.example.com , http://localhost:5173 ",
            ["https://a.example.com", "http://localhost:5173"],
        ),
        (
            '["https://a.example.com", "http://[::1]:8080"]',
            ["https://a.example.com", "http://[::1]:8080"],
        ),
        ("", []),
    ],
)
def test_cors_origins_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, origins: list[str]
):
    monkeypatch.setenv("TASKAPP_CORS_ORIGINS", value)
    assert Settings(_env_file=None).cors_origins == origins


@pytest.mark.parametrize(
    "value", ["https://a.example.com/app", "a.example.com", "ftp://a.example.com", "https://a b"]
)
def test_what_is_not_an_origin_is_refused(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("TASKAPP_CORS_ORIGINS", value)
    with pytest.raises(ValidationError, match="is not an origin"):
        Settings(_env_file=None)


async def test_docs_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, make_settings):
    monkeypatch.setenv("TASKAPP_DOCS_ENABLED", "false")
    assert Settings(_env_file=None).docs_enabled is False
    app: FastAPI = create_app(make_settings(docs_enabled=False))
    async with running(app) as client:
        for path in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/healthz")).status_code == 200
