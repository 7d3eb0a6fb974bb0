"""The published API description, the unauthenticated endpoints, and request ids."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from taskapp.config import Settings
from taskapp.http.requestid import current_request_id
from testing.oidc import OIDCProvider
from tests.conftest import running

TASK_OPERATIONS = [
    ("post", "/tasks"),
    ("get", "/tasks"),
    ("get", "/tasks/{task_id}"),
    ("patch", "/tasks/{task_id}"),
    ("delete", "/tasks/{task_id}"),
]
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = spec
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def normalized(path: str) -> str:
    """The path with its parameter named as in TASK_OPERATIONS, whatever the code calls it."""
    return re.sub(r"\{[^}]+\}", "{task_id}", path)


def task_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        if path == "/tasks" or path.startswith("/tasks/")
        for method, operation in item.items()
    ]


async def test_task_routes_are_the_contracts(client: httpx.AsyncClient) -> None:
    spec = await openapi(client)
    found = {(method, normalized(path)) for method, path, _ in task_operations(spec)}
    assert found == set(TASK_OPERATIONS)


@pytest.mark.parametrize(("method", "path"), TASK_OPERATIONS)
async def test_task_operation_documents_its_errors(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    spec = await openapi(client)
    [operation] = [
        op for m, p, op in task_operations(spec) if m == method and normalized(p) == path
    ]
    responses = operation["responses"]
    expected = {"401", "403", "503"}
    has_input = bool(operation.get("parameters")) or "requestBody" in operation
    assert has_input  # every task route takes a path parameter, query parameters or a body
    expected.add("422")
    if path.endswith("}"):
        expected.add("404")
    assert expected <= set(responses), sorted(responses)
    for code in sorted(expected):
        entry = responses[code]
        assert entry.get("description"), code
        schema = resolve(spec, entry["content"]["application/json"]["schema"])
        assert "detail" in schema.get("properties", {}), (code, schema)
    # The 422 body is a list of {loc, msg, type}.
    validation = resolve(spec, responses["422"]["content"]["application/json"]["schema"])
    item = resolve(spec, validation["properties"]["detail"]["items"])
    assert {"loc", "msg", "type"} <= set(item["required"])
    # The success status is documented too.
    success = {"post": "201", "delete": "204"}.get(method, "200")
    assert success in responses


async def test_bearer_security_scheme_exists(client: httpx.AsyncClient) -> None:
    spec = await openapi(client)
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http"
    assert scheme["scheme"].lower() == "bearer"


@pytest.mark.parametrize(("method", "path"), TASK_OPERATIONS)
async def test_task_operation_requires_bearer_auth(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    spec = await openapi(client)
    for m, p, operation in task_operations(spec):
        if m == method and normalized(p) == path:
            assert {"bearerAuth": []} in operation.get("security", []), operation.get("security")
            break
    else:
        pytest.fail(f"{method} {path} is not documented")


@pytest.mark.parametrize(("method", "path"), TASK_OPERATIONS)
async def test_task_operation_really_needs_a_token(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    url = path.replace("{task_id}", str(uuid.uuid4()))
    kwargs: dict[str, Any] = {"json": {"title": "x"}} if method in {"post", "patch"} else {}
    response = await client.request(method.upper(), url, **kwargs)
    assert response.status_code == 401
    assert isinstance(response.json()["detail"], str)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_every_operation_has_a_description(client: httpx.AsyncClient) -> None:
    spec = await openapi(client)
    missing = [
        f"{method.upper()} {path}"
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if not operation.get("description", "").strip()
    ]
    assert missing == []
    assert {"/healthz", "/readyz"} <= set(spec["paths"])


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_needs_no_auth(client: httpx.AsyncClient, path: str) -> None:
    spec = await openapi(client)
    assert not spec["paths"][path]["get"].get("security")
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


async def test_readyz_reports_each_dependency(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


async def test_docs_serve_html(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger" in response.text.lower()
    assert "/openapi.json" in response.text


# --- request ids --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "authed", "status"),
    [
        ("GET", "/healthz", False, 200),
        ("GET", "/tasks", False, 401),
        ("GET", "/tasks", True, 200),
        ("GET", f"/tasks/{uuid.UUID(int=1)}", True, 404),
        ("GET", "/tasks/not-a-uuid", True, 422),
        ("POST", "/tasks", True, 422),
        ("GET", "/no-such-route", False, 404),
    ],
)
async def test_every_response_has_a_request_id(
    client: httpx.AsyncClient,
    oidc: OIDCProvider,
    method: str,
    path: str,
    authed: bool,
    status: int,
) -> None:
    headers = oidc.auth("alice") if authed else {}
    kwargs: dict[str, Any] = {"json": {}} if method == "POST" else {}
    response = await client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status
    assert SAFE_REQUEST_ID.match(response.headers["x-request-id"])


async def test_generated_request_ids_are_unique(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    "incoming", ["abc-123", "req.42:7_x", str(uuid.uuid4()), uuid.uuid4().hex, "a" * 128]
)
async def test_sane_request_id_is_echoed(client: httpx.AsyncClient, incoming: str) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] == incoming


@pytest.mark.parametrize(
    "incoming",
    [
        "a" * 300,
        "a" * 129,
        "has spaces in it",
        "<script>alert(1)</script>",
        "id;rm -rf /",
        "ünïcode",
        "",
    ],
)
async def test_unsafe_request_id_is_replaced(client: httpx.AsyncClient, incoming: str) -> None:
    response = await client.get("/healthz", headers={b"X-Request-ID": incoming.encode("utf-8")})
    assert response.status_code == 200
    echoed = response.headers["x-request-id"]
    assert echoed != incoming
    assert echoed.encode() != incoming.encode("utf-8")
    assert SAFE_REQUEST_ID.match(echoed)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_unexpected_error_is_a_bare_500_that_keeps_the_request_id(
    make_settings: Callable[..., Settings],
) -> None:
    # A real app with one extra route that fails the way a bug would: the test exercises the
    # real middleware and handlers, not a stand-in.
    from taskapp.app import create_app

    app = create_app(make_settings())
    seen: dict[str, str | None] = {}

    async def boom() -> None:
        seen["request_id"] = current_request_id()
        raise RuntimeError("internal detail: password=hunter2")

    app.add_api_route("/boom", boom, description="Fails on purpose.")
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        async with running(app) as client:
            response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    finally:
        logging.getLogger().removeHandler(records)
    assert seen["request_id"] == "boom-1"
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error", "code": "internal_error"}
    assert "hunter2" not in response.text
    assert response.headers.get("x-request-id") == "boom-1"
    logged = [record.getMessage() for record in records.records if record.levelno >= logging.ERROR]
    assert any("boom-1" in message for message in logged), logged
