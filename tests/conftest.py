"""Test session: real PostgreSQL, real Redis, a real OIDC provider, the app in-process."""

from __future__ import annotations

import contextlib
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from taskapp.app import create_app
from taskapp.cli.embedded import embedded_postgres
from taskapp.config import (
    DatabaseSettings,
    NotificationSettings,
    OIDCSettings,
    RateLimitSettings,
    RedisSettings,
    Settings,
)
from taskapp.database.migrations import upgrade_database
from taskapp.state import State, state_of
from testing.oidc import OIDCProvider, serve_provider
from testing.processes import clean_env
from testing.services import Unavailable, postgres_server, redis_server, scratch_database

# Under CI=true the whole suite must run: a skipped test is a failure there.
STRICT = bool(os.environ.get("CI"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """What a harness found missing (`testing.services.Unavailable`) skips the test, with the
    reason; under CI=true, where everything must be there, every skip fails instead."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if call.excinfo is not None and call.excinfo.errisinstance(Unavailable) and not STRICT:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
    elif report.skipped and STRICT:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def postgres_admin_url(session_dir: Path) -> Iterator[str]:
    with postgres_server(session_dir) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(session_dir: Path) -> Iterator[str]:
    with redis_server(session_dir) as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A migrated database of its own for this test session."""
    with scratch_database(postgres_admin_url) as url:
        upgrade_database(url)
        yield url


@pytest.fixture(scope="session")
def oidc() -> Iterator[OIDCProvider]:
    yield from serve_provider()


@pytest.fixture
def serve_env(
    tmp_path: Path, database_url: str, redis_url: str, oidc: OIDCProvider
) -> dict[str, str]:
    """The environment of a `taskapp serve` process on this session's services."""
    return clean_env(
        TASKAPP_DATA_DIR=str(tmp_path),
        TASKAPP_DATABASE_URL=database_url,
        TASKAPP_REDIS_URL=redis_url,
        TASKAPP_OIDC_ISSUER=oidc.issuer,
    )


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A migrated PostgreSQL server of this test's own, which the test may stop and start:
    its URL and data directory."""
    data_dir = tmp_path / "pg"
    with embedded_postgres(data_dir) as url:
        upgrade_database(url)
        yield url, data_dir


SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="session")
def make_settings(database_url: str, redis_url: str, oidc: OIDCProvider) -> SettingsFactory:
    """Settings for an app under test; keyword groups override single fields."""

    def make(
        *,
        database: dict[str, Any] | None = None,
        redis: dict[str, Any] | None = None,
        oidc_: dict[str, Any] | None = None,
        ratelimit: dict[str, Any] | None = None,
        notifications: dict[str, Any] | None = None,
        **top: Any,
    ) -> Settings:
        return Settings(
            _env_file=None,
            env="test",
            database=DatabaseSettings(
                _env_file=None,
                **{"url": database_url, "pool_timeout": 2, **(database or {})},
            ),
            # A key prefix of its own per app: no cached entry or rate-limit bucket is shared
            # with another test's app unless a test asks for it.
            redis=RedisSettings(
                _env_file=None,
                **{"url": redis_url, "key_prefix": f"test-{uuid.uuid4().hex}:", **(redis or {})},
            ),
            oidc=OIDCSettings(_env_file=None, **{"issuer": oidc.issuer, **(oidc_ or {})}),
            # No e-mail unless a test is about it (those bring a broker and a worker).
            notifications=NotificationSettings(
                _env_file=None, **{"enabled": False, **(notifications or {})}
            ),
            # Limits out of the way unless a test is about them.
            ratelimit=RateLimitSettings(
                _env_file=None,
                **{
                    "per_user": "1000000/second",
                    "anonymous": "1000000/second",
                    **(ratelimit or {}),
                },
            ),
            # Many apps start in one test process: nothing of theirs should become permanent.
            **{"gc_freeze": False, **top},
        )

    return make


# The state of each app started by `running` (its clients are closed once it has stopped).
_STATES: weakref.WeakKeyDictionary[FastAPI, State] = weakref.WeakKeyDictionary()


def app_state(app: FastAPI) -> State:
    """The typed state of a running app (see `running`)."""
    return _STATES[app]


def _state_per_request(app: FastAPI) -> ASGIApp:
    """Give each request a shallow copy of the lifespan state, as ASGI servers do, and keep
    the app's own state for `app_state` once it has started.

    asgi-lifespan hands every request the same dict, so what one request kept in it would
    still be there for the next one.
    """

    async def with_own_state(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            lifespan_dict = scope["state"]

            async def send_and_note(message: Any) -> None:
                if message["type"] == "lifespan.startup.complete":
                    with contextlib.suppress(KeyError):  # an app other than taskapp's
                        _STATES[app] = state_of({"state": lifespan_dict})
                await send(message)

            await app(scope, receive, send_and_note)
            return
        if "state" in scope:
            scope["state"] = dict(scope["state"])
        await app(scope, receive, send)

    return with_own_state


@contextlib.asynccontextmanager
async def running(
    app: FastAPI, *, peer: tuple[str, int] = ("127.0.0.1", 123)
) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (lifespan) with an HTTP client speaking ASGI to it from `peer`."""
    async with LifespanManager(_state_per_request(app)) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False, client=peer)
        async with httpx.AsyncClient(transport=transport, base_url="http://taskapp.test") as client:
            yield client


_CLIENTS: weakref.WeakKeyDictionary[FastAPI, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def client_of(app: FastAPI) -> httpx.AsyncClient:
    """The client of the session's shared app (the `app` fixture)."""
    return _CLIENTS[app]


@pytest.fixture(scope="session")
async def app(make_settings: SettingsFactory) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings())
    async with running(application) as client:
        _CLIENTS[application] = client
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The shared app's client; every task, project and directory entry (and every cached
    response) is removed after."""
    yield client_of(app)
    state = app_state(app)
    async with state.engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks, project_members, projects, users"))
    state.directory_seen.clear()
    await state.cache.clear()
