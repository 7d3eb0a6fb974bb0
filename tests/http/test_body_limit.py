"""Request bodies are capped before anything parses them; the limit is documented."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sqlalchemy import text

from taskapp.app import create_app
from tests.conftest import app_state, running
from tests.fixtures.tasks import db_count


async def test_declared_oversize_body_is_413_without_reading_it(client, app, oidc):
    body = b'{"title": "x", "description": "' + b"a" * 300_000 + b'"}'
    response = await client.post(
        "/tasks", content=body, headers={**oidc.auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large", "code": "body_too_large"}
    assert "RateLimit-Remaining" in response.headers  # counted like any other request
    assert await db_count(app) == 0


async def test_streamed_oversize_body_is_413(client, app, oidc):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"title": "x", "description": "'
        for _ in range(40):
            yield b"a" * 10_000
        yield b'"}'

    response = await client.post(
        "/tasks", content=chunks(), headers={**oidc.auth(), "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large", "code": "body_too_large"}
    assert await db_count(app) == 0


async def test_oversize_body_is_refused_before_authentication(client):
    response = await client.post("/tasks", content=b"x" * 300_000)
    assert response.status_code == 413


async def test_largest_valid_task_fits_under_the_default_limit(client, oidc):
    # 10,000 characters outside the BMP, each escaped as a surrogate pair: ~120 KB of JSON.
    description = "\N{GRINNING FACE}" * 10_000
    body = json.dumps({"title": "t" * 255, "description": description}).encode()
    assert len(body) > 100_000
    response = await client.post(
        "/tasks", content=body, headers={**oidc.auth(), "Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["description"] == description


async def test_limit_is_configurable(make_settings, oidc):
    app = create_app(make_settings(max_body_bytes=2048))
    async with running(app) as client:
        ok = await client.post("/tasks", json={"title": "small"}, headers=oidc.auth())
        big = await client.post(
            "/tasks", json={"title": "x", "description": "a" * 3000}, headers=oidc.auth()
        )
        assert ok.status_code == 201
        assert big.status_code == 413
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))


async def test_openapi_documents_413_400_500_and_error_headers(client):
    schema = (await client.get("/openapi.json")).json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "500" in operation["responses"], (method, path)
            if path.startswith("/tasks"):
                unauthorized = operation["responses"]["401"]
                assert "WWW-Authenticate" in unauthorized["headers"]
                assert "Retry-After" in operation["responses"]["503"]["headers"]
            if method in {"post", "patch"}:
                assert {"400", "413"} <= set(operation["responses"]), (method, path)


async def test_every_operation_documents_the_413_it_can_answer(client, oidc):
    # The cap stands in front of every route: a GET or DELETE with an oversize body gets 413
    # too, so every operation must document it (found by `make fuzz`).
    schema = (await client.get("/openapi.json")).json()
    headers = oidc.auth("root", roles=("admin",))
    for path, operations in schema["paths"].items():
        url = path.replace("{task_id}", "00000000-0000-4000-8000-000000000000")
        for method, operation in operations.items():
            response = await client.request(
                method.upper(), url, content=b"x" * 300_000, headers=headers
            )
            assert response.status_code == 413, (method, path, response.text)
            assert response.json() == {"detail": "Request body too large", "code": "body_too_large"}
            assert "413" in operation["responses"], (method, path)
