"""Test session: real PostgreSQL, real Redis, a real OIDC provider, the app in-process."""

from __future__ import annotations

import contextlib
import uuid
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
from taskapp.config import (
    DatabaseSettings,
    NotificationSettings,
    OIDCSettings,
    RateLimitSettings,
    RedisSettings,
    Settings,
)
from taskapp.db import upgrade_database
from taskapp.embedded import embedded_postgres
from tests.fixtures.oidc import OIDCProvider, serve_provider
from tests.fixtures.processes import clean_env
from tests.fixtures.services import postgres_server, redis_server, scratch_database


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


def _state_per_request(app: ASGIApp) -> ASGIApp:
    """Give each request a shallow copy of the lifespan state, as ASGI servers do.

    asgi-lifespan hands every request the same dict, so what one request keeps in
    `request.state` (its verified caller, say) would still be there for the next one.
    """

    async def with_own_state(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan" and "state" in scope:
            scope["state"] = dict(scope["state"])
        await app(scope, receive, send)

    return with_own_state


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (lifespan) with an HTTP client speaking ASGI to it."""
    async with LifespanManager(_state_per_request(app)) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://taskapp.test") as client:
            yield client


@pytest.fixture(scope="session")
async def app(make_settings: SettingsFactory) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings())
    async with running(application) as client:
        application.state.test_client = client
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The shared app's client; every task (and every cached response) is removed after."""
    yield app.state.test_client
    async with app.state.engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks"))
    await app.state.cache.clear()
