"""Lean routes: served without FastAPI's request machinery, answering exactly as FastAPI does.

The same generated requests go to the application as it runs and to a copy of it whose lean
routes are left to FastAPI; every answer must be the same, status, body and headers.
"""

from __future__ import annotations

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
from taskapp.http.routing import LeanRoute, LeanRoutes, lean_get, lean_routes
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, running

NO_LIMITS = {"per_user": "1000000/second", "anonymous": "1000000/second"}
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
    lean = create_app(make_settings(ratelimit=NO_LIMITS))
    plain = _without_lean_routes(create_app(make_settings(ratelimit=NO_LIMITS)))
    async with running(lean) as lean_client, running(plain) as plain_client:
        yield lean_client, plain_client


@pytest.fixture(scope="module")
async def tasks(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], oidc: OIDCProvider
) -> list[str]:
    """Tasks of two owners, made through the API."""
    lean, _ = clients
    made = []
    for owner in ("routing-alice", "routing-bob"):
        for number in range(12):
            response = await lean.post(
                "/tasks",
                json={"title": f"{owner} {number}", "status": ("pending", "completed")[number % 2]},
                headers=oidc.auth(owner),
            )
            assert response.status_code == 201
            made.append(response.json()["id"])
    return made


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


async def test_the_answers_compared_are_of_every_kind(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient], tasks: list[str], oidc: OIDCProvider
) -> None:
    """The comparisons above reach every outcome: found, not found, invalid, refused."""
    alice = _headers(oidc, "routing-alice")
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "page": ("/tasks?page=2&page_size=5&status=completed", alice),
        "admin page": ("/tasks?owner=routing-bob", _headers(oidc, "admin")),
        "task": (f"/tasks/{tasks[0]}", alice),
        "another owner's task": (f"/tasks/{tasks[-1]}", alice),
        "invalid query": ("/tasks?page=0&page_size=x&status=done", alice),
        "invalid id": ("/tasks/not-a-uuid", alice),
        "another owner's list": ("/tasks?owner=routing-bob", alice),
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
        assert (await client.post("/tasks", json={"title": "x"}, headers=alice)).status_code == 201
        assert (await client.head("/tasks", headers=alice)).status_code == 405
        assert (await client.get("/healthz")).status_code == 200
    assert calls == ["/tasks", "/tasks/{task_id}"]


async def test_an_unexpected_error_on_a_lean_route_is_a_bare_500_with_the_request_id(
    make_settings: SettingsFactory,
) -> None:
    app = create_app(make_settings())
    router = APIRouter()

    @lean_get(router, "/lean-boom")
    async def boom() -> Response:
        raise RuntimeError("internal detail: password=hunter2")

    app.include_router(router)
    lean = Middleware(LeanRoutes, routes=lean_routes(router))
    app.user_middleware = [lean if _is_lean_routes(m) else m for m in app.user_middleware]
    async with running(app) as client:
        response = await client.get("/lean-boom", headers={"X-Request-ID": "lean-boom-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error", "code": "internal_error"}
    assert response.headers["x-request-id"] == "lean-boom-1"


async def _takes_a_body(title: Annotated[str, Body()]) -> Response:
    return Response()


async def _takes_a_header(x_thing: Annotated[str, Header()]) -> Response:
    return Response()


@pytest.mark.parametrize("endpoint", [_takes_a_body, _takes_a_header])
def test_a_route_lean_routes_cannot_serve_is_refused_when_declared(
    endpoint: Callable[..., Any],
) -> None:
    with pytest.raises(TypeError, match="served lean"):
        lean_get(APIRouter(), "/x")(endpoint)


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
        lean_get(APIRouter(), "/x")(endpoint)
