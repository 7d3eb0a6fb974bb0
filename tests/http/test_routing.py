"""Lean routes: served without FastAPI's request machinery, answering exactly as FastAPI does.

The same generated requests go to the application as it runs and to a copy of it whose lean
routes are left to FastAPI; every answer must be the same, status, body and headers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Request, Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.middleware import Middleware

from taskapp.app import create_app
from taskapp.auth.dependencies import bearer_scheme
from taskapp.http import routing
from taskapp.http.routing import LeanRoute, LeanRoutes, lean_route, routes_of
from taskapp.membership.models import inbox_id
from taskapp.tasks.router import router as tasks_router
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, running

NO_LIMITS = {"per_user": "1000000/second", "anonymous": "1000000/second"}
# Redis given the longest wait the settings allow: on a loaded machine a call over the
# default 0.2 s fails open (no RateLimit-* headers) on one app and not the other.
PATIENT = {"ratelimit": {**NO_LIMITS, "timeout": 5}, "cache": {"timeout": 5}}
# Headers that differ between any two answers, whoever serves them.
VARYING = {"x-request-id", "date"}


def _is_lean_routes(middleware: Middleware) -> bool:
    cls: Any = middleware.cls
    return cls is LeanRoutes


def _without_lean_routes(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if not _is_lean_routes(m)]
    return app


@pytest.fixture(scope="module")
async def clients(
    make_settings: SettingsFactory,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    lean = create_app(make_settings(**PATIENT))
    plain = _without_lean_routes(create_app(make_settings(**PATIENT)))
    async with running(lean) as lean_client, running(plain) as plain_client:
        yield lean_client, plain_client


async def _make_tasks(client: httpx.AsyncClient, oidc: OIDCProvider, *owners: str) -> list[str]:
    """Twelve tasks of each owner, every other one completed."""
    made = []
    for owner in owners:
        for number in range(12):
            response = await client.post(
                "/tasks",
                json={"title": f"{owner} {number}", "status": ("pending", "completed")[number % 2]},
                headers=oidc.auth(owner),
            )
            assert response.status_code == 201
            made.append(response.json()["id"])
    return made


@pytest.fixture(scope="module")
async def tasks(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], oidc: OIDCProvider
) -> list[str]:
    """Tasks of two owners, made through the API (the examples may change them)."""
    return await _make_tasks(clients[0], oidc, "routing-alice", "routing-bob")


def _answer(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in VARYING}
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return response.status_code, body, headers


async def _same_answer(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], url: str, headers: dict[str, str]
) -> tuple[int, Any, dict[str, str]]:
    lean, plain = clients
    answers = [_answer(await client.get(url, headers=headers)) for client in (lean, plain)]
    assert answers[0] == answers[1], url
    return answers[0]


value = st.one_of(
    st.integers(min_value=-3, max_value=1_000_002).map(str),
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "100",
            "101",
            "1e3",
            "2.0",
            " 1",
            "pending",
            "completed",
            "in_progress",
            "PENDING",
            "routing-alice",
            "routing-bob",
            "\x00",
            "%00",
            "\ud800",
            "null",
            "[1]",
        ]
    ),
    st.text(max_size=12),
)
key = st.sampled_from(["page", "page_size", "owner", "status", "task_status", "other", "PAGE"])
query = st.lists(st.tuples(key, value), max_size=5)
who = st.sampled_from(["routing-alice", "routing-bob", "admin", "nobody", "anonymous", "garbage"])


def _headers(oidc: OIDCProvider, caller: str) -> dict[str, str]:
    if caller == "anonymous":
        return {}
    if caller == "garbage":
        return {"Authorization": "Bearer not-a-token"}
    if caller == "admin":
        return oidc.auth("routing-admin", roles=["admin"])
    if caller == "nobody":
        return oidc.auth("routing-nobody", roles=["offline_access"])
    return oidc.auth(caller)


EXAMPLES = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@EXAMPLES
@given(pairs=query, caller=who)
async def test_a_list_is_answered_as_fastapi_answers_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    tasks: list[str],
    oidc: OIDCProvider,
    pairs: list[tuple[str, str]],
    caller: str,
) -> None:
    raw = "&".join(f"{quote(k)}={quote(v, safe='', errors='surrogatepass')}" for k, v in pairs)
    await _same_answer(clients, f"/tasks?{raw}", _headers(oidc, caller))


@EXAMPLES
@given(
    segment=st.one_of(
        st.sampled_from(["not-a-uuid", "", "00000000-0000-0000-0000-000000000000", "%00"]),
        st.uuids().map(str),
        st.text(max_size=40).map(lambda t: quote(t, safe="", errors="surrogatepass")),
        st.integers(min_value=0, max_value=23),
    ),
    caller=who,
    suffix=st.sampled_from(["", "?page=0", "?x=1"]),
)
async def test_a_task_is_answered_as_fastapi_answers_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    tasks: list[str],
    oidc: OIDCProvider,
    segment: str | int,
    caller: str,
    suffix: str,
) -> None:
    path = tasks[segment] if isinstance(segment, int) else segment
    await _same_answer(clients, f"/tasks/{path}{suffix}", _headers(oidc, caller))


# Fields a write answers with that differ between any two writes, whoever serves them.
WRITTEN = {"id", "created_at", "updated_at"}


def _written(answer: tuple[int, Any, dict[str, str]]) -> tuple[int, Any, dict[str, str]]:
    status, body, headers = answer
    if status < 300 and isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in WRITTEN}
        headers = {k: v for k, v in headers.items() if k != "content-length"}
    return status, body, headers


field_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=2),
    st.sampled_from(["", "  ", "x", "pending", "completed", "in_progress", "done", "\x00",
                     "a" * 256, "\ud800"]),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)  # fmt: skip
json_object = st.dictionaries(
    st.sampled_from(["title", "description", "status", "owner", "id", "Title"]),
    field_value,
    max_size=4,
)
raw_body = st.one_of(
    json_object.map(lambda o: json.dumps(o).encode()),
    st.sampled_from(
        [b"", b"{", b"null", b"[]", b'"title"', b"\xff\xfe", b'{"title": "a"', b"NaN",
         b'{"title": "a"} x', b'{"title": "\\ud800"}', b"1e999"]
    ),
)  # fmt: skip
content_type = st.sampled_from(
    [None, "application/json", "", "text/plain", "application/vnd.api+json",
     "application/json; charset=utf-8", "multipart/form-data", "application/xml"]
)  # fmt: skip


def _write_headers(oidc: OIDCProvider, caller: str, kind: str | None) -> dict[str, str]:
    headers = _headers(oidc, caller)
    if kind is not None:
        headers["Content-Type"] = kind
    return headers


async def _same_write(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    method: str,
    urls: tuple[str, str],
    body: bytes,
    headers: dict[str, str],
) -> tuple[int, Any, dict[str, str]]:
    answers = [
        _written(_answer(await client.request(method, url, content=body, headers=headers)))
        for client, url in zip(clients, urls, strict=True)
    ]
    assert answers[0] == answers[1], (method, urls, body, headers)
    return answers[0]


@EXAMPLES
@given(body=raw_body, kind=content_type, caller=who)
async def test_a_create_is_answered_as_fastapi_answers_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    oidc: OIDCProvider,
    body: bytes,
    kind: str | None,
    caller: str,
) -> None:
    headers = _write_headers(oidc, caller, kind)
    await _same_write(clients, "POST", ("/tasks", "/tasks"), body, headers)


@EXAMPLES
@given(
    body=raw_body,
    kind=content_type,
    caller=who,
    target=st.one_of(st.integers(min_value=0, max_value=23), st.sampled_from(["x", "0"])),
)
async def test_a_change_is_answered_as_fastapi_answers_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    tasks: list[str],
    oidc: OIDCProvider,
    body: bytes,
    kind: str | None,
    caller: str,
    target: int | str,
) -> None:
    path = f"/tasks/{tasks[target] if isinstance(target, int) else target}"
    headers = _write_headers(oidc, caller, kind)
    await _same_write(clients, "PATCH", (path, path), body, headers)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(caller=who, target=st.sampled_from(["own", "unknown", "invalid"]))
async def test_a_deletion_is_answered_as_fastapi_answers_it(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    oidc: OIDCProvider,
    caller: str,
    target: str,
) -> None:
    paths = []
    for client in clients:
        if target == "own":
            made = await client.post(
                "/tasks", json={"title": "x"}, headers=oidc.auth("routing-alice")
            )
            paths.append(f"/tasks/{made.json()['id']}")
        else:
            paths.append(f"/tasks/{uuid.uuid4() if target == 'unknown' else 'x'}")
    await _same_write(clients, "DELETE", (paths[0], paths[1]), b"", _headers(oidc, caller))


async def test_the_answers_compared_are_of_every_kind(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], oidc: OIDCProvider
) -> None:
    """The comparisons above reach every outcome: found, not found, invalid, refused."""
    carol, dave = f"routing-carol-{uuid.uuid4().hex[:8]}", f"routing-dave-{uuid.uuid4().hex[:8]}"
    tasks = await _make_tasks(clients[0], oidc, carol, dave)
    alice = oidc.auth(carol)
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "page": ("/tasks?page=2&page_size=5&status=completed", alice),
        "admin page": (f"/tasks?owner={dave}", _headers(oidc, "admin")),
        "task": (f"/tasks/{tasks[0]}", alice),
        "another owner's task": (f"/tasks/{tasks[-1]}", alice),
        "invalid query": ("/tasks?page=0&page_size=x&status=done", alice),
        "invalid id": ("/tasks/not-a-uuid", alice),
        "another owner's list": (f"/tasks?owner={dave}", alice),
        "no role": ("/tasks", _headers(oidc, "nobody")),
        "no token": ("/tasks/not-a-uuid", {}),
        "bad token": ("/tasks", _headers(oidc, "garbage")),
    }
    seen = {name: await _same_answer(clients, url, h) for name, (url, h) in cases.items()}
    assert seen["page"][0] == 200
    assert seen["page"][1]["total"] == 6
    assert len(seen["page"][1]["items"]) == 1
    assert seen["admin page"][1]["total"] == 12
    assert seen["task"][1]["id"] == tasks[0]
    assert seen["another owner's task"][:2] == (
        404,
        {"detail": "Task not found", "code": "task_not_found"},
    )
    invalid = seen["invalid query"][1]
    assert [e["loc"] for e in invalid["detail"]] == [
        ["query", "page"],
        ["query", "page_size"],
        ["query", "status"],
    ]
    assert seen["invalid id"][1]["detail"][0]["loc"] == ["path", "task_id"]
    assert seen["another owner's list"][0] == 403
    assert seen["no role"][1]["code"] == "forbidden"
    assert seen["no token"][1]["code"] == "not_authenticated"  # before the id is looked at
    assert seen["bad token"][1]["code"] == "token_invalid"
    for status, _, headers in seen.values():
        assert "ratelimit-limit" in headers, status
        assert headers["x-content-type-options"] == "nosniff"

    json_body = {"Content-Type": "application/json"}
    writes: dict[str, tuple[str, tuple[str, str], bytes, dict[str, str]]] = {
        "create": ("POST", ("/tasks", "/tasks"), b'{"title": " t ", "status": "completed"}',
                   {**alice, **json_body}),
        "not JSON": ("POST", ("/tasks", "/tasks"), b'{"title"', json_body),
        "no content type": ("POST", ("/tasks", "/tasks"), b'{"title": "t"}', alice),
        "no body": ("POST", ("/tasks", "/tasks"), b"", {**alice, **json_body}),
        "unknown field": ("POST", ("/tasks", "/tasks"), b'{"title": "t", "x": 1}',
                          {**alice, **json_body}),
        "patch": ("PATCH", (f"/tasks/{tasks[1]}",) * 2, b'{"status": "pending"}',
                  {**alice, **json_body}),
        "patch another's": ("PATCH", (f"/tasks/{tasks[-1]}",) * 2, b'{"title": "x"}',
                            {**alice, **json_body}),
        "delete as a user": ("DELETE", (f"/tasks/{tasks[2]}",) * 2, b"", alice),
        "delete unknown": ("DELETE", (f"/tasks/{uuid.uuid4()}",) * 2, b"",
                           _headers(oidc, "admin")),
    }  # fmt: skip
    wrote = {
        name: await _same_write(clients, method, urls, body, headers)
        for name, (method, urls, body, headers) in writes.items()
    }
    assert wrote["create"][:2] == (
        201,
        {
            "owner": carol,
            "project_id": str(inbox_id(carol)),
            "created_by": carol,
            "assignees": [],
            "title": "t",
            "description": None,
            "status": "completed",
        },
    )
    assert wrote["not JSON"][1]["detail"][0]["type"] == "json_invalid"  # before the token
    assert wrote["no content type"][1]["detail"][0]["loc"] == ["body"]
    assert wrote["no body"][1]["detail"] == [
        {"loc": ["body"], "msg": "Field required", "type": "missing"}
    ]
    assert wrote["unknown field"][1]["detail"][0]["type"] == "extra_forbidden"
    assert wrote["patch"][:1] == (200,)
    assert wrote["patch"][1]["status"] == "pending"
    assert wrote["patch another's"][1]["code"] == "task_not_found"
    assert wrote["delete as a user"][1]["code"] == "forbidden"
    assert wrote["delete unknown"][1]["code"] == "task_not_found"


async def test_lean_routes_are_served_lean(
    make_settings: SettingsFactory, oidc: OIDCProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    original = LeanRoutes._serve

    async def counted(route: LeanRoute, *args: Any) -> None:
        calls.append(route.path)
        await original(route, *args)

    monkeypatch.setattr(LeanRoutes, "_serve", staticmethod(counted))
    async with running(create_app(make_settings())) as client:
        alice = oidc.auth("routing-lean")
        assert (await client.get("/tasks", headers=alice)).status_code == 200
        assert (await client.get(f"/tasks/{uuid.uuid4()}", headers=alice)).status_code == 404
        created = await client.post("/tasks", json={"title": "x"}, headers=alice)
        assert created.status_code == 201
        task = f"/tasks/{created.json()['id']}"
        assert (await client.patch(task, json={"title": "y"}, headers=alice)).status_code == 200
        admin = oidc.auth("routing-lean-admin", roles=["admin"])
        assert (await client.delete(task, headers=admin)).status_code == 204
        assert (await client.head("/tasks", headers=alice)).status_code == 405
        assert (await client.put(task, json={}, headers=alice)).status_code == 405
        assert (await client.get("/healthz")).status_code == 200
    assert calls == ["/tasks", "/tasks/{task_id}", "/tasks", "/tasks/{task_id}", "/tasks/{task_id}"]


async def test_an_unexpected_error_on_a_lean_route_is_a_bare_500_with_the_request_id(
    make_settings: SettingsFactory,
) -> None:
    app = create_app(make_settings())
    router = APIRouter()

    @lean_route(router, "GET", "/lean-boom")
    async def boom() -> Response:
        raise RuntimeError("internal detail: password=hunter2")

    app.include_router(router)
    lean = Middleware(LeanRoutes, routes=routes_of(router))
    app.user_middleware = [lean if _is_lean_routes(m) else m for m in app.user_middleware]
    async with running(app) as client:
        response = await client.get("/lean-boom", headers={"X-Request-ID": "lean-boom-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error", "code": "internal_error"}
    assert response.headers["x-request-id"] == "lean-boom-1"


async def test_a_plain_route_matched_first_is_left_to_fastapi(
    make_settings: SettingsFactory,
) -> None:
    app = create_app(make_settings())
    router = APIRouter()

    @router.get("/shadowed/{name}")
    async def plain(name: str) -> Response:
        return Response(b"plain")

    @lean_route(router, "GET", "/shadowed/{name}")
    async def lean(name: str) -> Response:
        return Response(b"lean")

    @lean_route(router, "GET", "/lean/{name}")
    async def only_lean(name: str) -> Response:
        return Response(b"lean")

    app.include_router(router)
    lean_routes = Middleware(LeanRoutes, routes=routes_of(router))
    app.user_middleware = [lean_routes if _is_lean_routes(m) else m for m in app.user_middleware]
    async with running(app) as client:
        assert (await client.get("/shadowed/x")).content == b"plain"
        assert (await client.get("/lean/x")).content == b"lean"


async def _takes_two_bodies(
    title: Annotated[str, Body()], status: Annotated[str, Body()]
) -> Response:
    return Response()


async def _takes_a_header(x_thing: Annotated[str, Header()]) -> Response:
    return Response()


@pytest.mark.parametrize("endpoint", [_takes_two_bodies, _takes_a_header])
def test_a_route_lean_routes_cannot_serve_is_refused_when_declared(
    endpoint: Callable[..., Any],
) -> None:
    with pytest.raises(TypeError, match="served lean"):
        lean_route(APIRouter(), "GET", "/x")(endpoint)


def _sync(request: Request) -> str:
    return "sync"


async def _needs_a_sync_dependency(value: Annotated[str, Depends(_sync)]) -> Response:
    return Response()


async def _needs_the_token(token: Annotated[str, Depends(bearer_scheme)]) -> Response:
    return Response()


@pytest.mark.parametrize("endpoint", [_needs_a_sync_dependency, _needs_the_token])
def test_a_dependency_lean_routes_cannot_resolve_is_refused_when_declared(
    endpoint: Callable[..., Any],
) -> None:
    with pytest.raises(TypeError, match="must be `async def f"):
        lean_route(APIRouter(), "GET", "/x")(endpoint)


async def test_a_query_string_validated_once_is_answered_the_same_after(
    make_settings: SettingsFactory, oidc: OIDCProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values kept per query string are those a fresh validation gives; a string that failed
    is validated (and refused) again each time; the strings kept are bounded."""
    monkeypatch.setattr(routing, "QUERY_STRINGS_KEPT", 3)
    app = create_app(make_settings(ratelimit=NO_LIMITS))
    route = next(
        r for r in tasks_router.routes if isinstance(r, LeanRoute) and r.methods == {"GET"}
    )
    assert route.path == "/tasks"
    validations: list[str] = []
    for field in route.dependant.query_params:
        original = field.validate

        def counted(value: Any, *args: Any, _original: Any = original, **kw: Any) -> Any:
            validations.append(value)
            return _original(value, *args, **kw)

        monkeypatch.setattr(field, "validate", counted)
    # Kept per route, whatever the app: strings of this test's own (FastAPI ignores `x`).
    mine = uuid.uuid4().hex
    user = f"routing-kept-{mine[:8]}"
    alice = oidc.auth(user)
    async with running(app) as client:
        await _make_tasks(client, oidc, user)
        url = f"/tasks?page=2&page_size=5&status=completed&x={mine}"
        first = await client.get(url, headers=alice)
        validated = len(validations)
        assert validated > 0
        again = await client.get(url, headers=alice)
        assert len(validations) == validated  # taken as kept
        assert again.status_code == first.status_code == 200
        assert again.json() == first.json()
        assert [item["status"] for item in again.json()["items"]] == ["completed"]
        for _ in range(2):
            refused = await client.get("/tasks?page=0", headers=alice)
            assert refused.status_code == 422
            assert refused.json()["detail"][0]["loc"] == ["query", "page"]
        assert len(validations) > validated  # the refused string is never kept
        for page in (1, 2, 3, 4):  # more strings than are kept: the first are forgotten
            answer = await client.get(f"/tasks?page={page}&x={mine}", headers=alice)
            assert answer.status_code == 200
        before = len(validations)
        assert (await client.get(f"/tasks?page=1&x={mine}", headers=alice)).status_code == 200
        assert len(validations) > before
