"""The quick `make fuzz`: Schemathesis and the hostile requests of reliability/fuzz.py, in-process.

Same checks as the full run (no server error, documented status, response schema, content
type), against the ASGI app on this session's PostgreSQL and Redis with real tokens; fewer
cases and a fixed seed, so it is fast and the same from run to run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from reliability.fuzz import Send, run_all, summary, targets
from taskapp.app import create_app
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, app_state, running

pytestmark = pytest.mark.slow

BASE_URL = "http://taskapp.test"
CASES = 300


@contextlib.contextmanager
def in_process(app: FastAPI) -> Iterator[tuple[Send, BlockingPortal]]:
    """The app started on an event loop of its own thread; a blocking `send` to it."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(running(app)) as client,
    ):

        def send(method: str, url: str, **options: Any) -> httpx.Response:
            return portal.call(functools.partial(client.request, method, url, **options))

        yield send, portal


def test_the_api_meets_its_schema_under_generated_and_hostile_input(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    app = create_app(make_settings())
    tokens = {
        "user": oidc.auth("fuzz-user", roles=("user",)),
        "admin": oidc.auth("fuzz-admin", roles=("admin",)),
    }
    with in_process(app) as (send, portal):
        known = targets(send, "", tokens)
        try:
            figures = run_all(
                send("GET", "/openapi.json").json(),
                send,
                BASE_URL,
                tokens,
                cases=CASES,
                seed=0,
                path_parameters=known,
                max_body_bytes=app_state(app).settings.max_body_bytes,
            )
        finally:
            portal.call(_truncate, app)
    report = summary(figures, list(tokens))
    assert not figures.failures, report
    assert figures.total >= CASES, report
    # Every operation was reached with each token, and the fuzz got past authentication.
    operations = {label for label, _, _ in figures.cases}
    assert len(operations) == 19, report
    assert {200, 201, 204, 400, 401, 403, 404, 413, 422} <= {s for _, s in figures.statuses}


async def _truncate(app: FastAPI) -> None:
    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks, project_members, projects, users"))


class Item(BaseModel):
    name: str


def _broken_app() -> FastAPI:
    """An API that breaks each rule the fuzz checks once."""
    app = FastAPI()

    @app.get("/crash")
    async def crash() -> Item:
        raise RuntimeError("boom")

    @app.get("/teapot")
    async def teapot() -> JSONResponse:
        return JSONResponse({"name": "tea"}, status_code=418)

    @app.get("/shape", response_model=Item)
    async def shape() -> JSONResponse:
        return JSONResponse({"nom": 1})

    @app.get("/picky")
    async def picky(limit: int = 10) -> Item:
        raise HTTPException(422, "no")

    @app.post("/items", response_model=Item)
    async def create(item: Item) -> Any:
        return JSONResponse({"name": item.name}, media_type="text/html")

    return app


def test_the_fuzz_reports_what_breaks_the_schema():
    with in_process(_broken_app()) as (send, _):
        figures = run_all(
            send("GET", "/openapi.json").json(),
            send,
            BASE_URL,
            {"anyone": {}},
            cases=20,
            seed=0,
            path_parameters={},
            max_body_bytes=1 << 20,
        )
    titles = "\n".join(figures.failures)
    assert "GET /crash [anyone/positive] Server error" in titles
    assert "GET /teapot [anyone/positive] Undocumented status code" in titles
    assert "GET /shape [anyone/positive] Response violates schema" in titles
    assert "POST /items [anyone/positive] Undocumented Content-Type" in titles
    assert "GET /picky [anyone/positive] Schema-valid request rejected" in titles
