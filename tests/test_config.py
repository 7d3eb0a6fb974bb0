"""Settings validation: production is strict, URLs are normalised, mistakes fail at start-up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from taskapp.config import Environment, Settings

GOOD_DATABASE_URL = "postgresql://taskapp:s3cret-Pa55@db.internal:5432/taskapp"
GOOD_REDIS_URL = "redis://:an0ther-s3cret@redis.internal:6379/0"
GOOD_ISSUER = "https://sso.example.com/realms/taskapp"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TASKAPP_* variables from the caller's shell, and no .env file to read."""
    for name in list(os.environ):
        if name.startswith("TASKAPP_"):
            monkeypatch.delenv(name)
    # The nested groups read `.env` from the working directory on their own.
    monkeypatch.chdir(tmp_path)


def load() -> Settings:
    return Settings(_env_file=None)


def set_production(monkeypatch: pytest.MonkeyPatch, **overrides: str | None) -> None:
    """A valid production environment, with some variables changed or removed (None)."""
    values: dict[str, str | None] = {
        "TASKAPP_ENV": "production",
        "TASKAPP_DATABASE_URL": GOOD_DATABASE_URL,
        "TASKAPP_REDIS_URL": GOOD_REDIS_URL,
        "TASKAPP_OIDC_ISSUER": GOOD_ISSUER,
        **overrides,
    }
    for name, value in values.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_valid_production_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch)
    settings = load()
    assert settings.env is Environment.PRODUCTION
    assert settings.is_production
    assert settings.oidc.issuer == GOOD_ISSUER
    assert settings.oidc.audience == "taskapp-api"
    assert settings.oidc.trust_dev_key is False


def test_dev_is_the_default_and_needs_nothing() -> None:
    settings = load()
    assert settings.env is Environment.DEV
    assert settings.oidc.issuer is None
    assert settings.database.url is None


def test_requests_are_logged_by_default_but_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load().logs_requests
    set_production(monkeypatch)
    assert not load().logs_requests
    monkeypatch.setenv("TASKAPP_ACCESS_LOG", "true")
    assert load().logs_requests
    monkeypatch.setenv("TASKAPP_ENV", "dev")
    monkeypatch.setenv("TASKAPP_ACCESS_LOG", "false")
    assert not load().logs_requests


def test_production_requires_an_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch, TASKAPP_OIDC_ISSUER=None)
    with pytest.raises(ValidationError, match="TASKAPP_OIDC_ISSUER"):
        load()


def test_production_refuses_an_empty_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch, TASKAPP_OIDC_ISSUER="")
    with pytest.raises(ValidationError, match="TASKAPP_OIDC_ISSUER"):
        load()


def test_production_refuses_the_dev_key(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch)
    monkeypatch.setenv("TASKAPP_OIDC_TRUST_DEV_KEY", "true")
    with pytest.raises(ValidationError, match="TASKAPP_OIDC_TRUST_DEV_KEY"):
        load()


def test_dev_may_trust_the_dev_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_OIDC_TRUST_DEV_KEY", "true")
    assert load().oidc.trust_dev_key is True


@pytest.mark.parametrize("password", ["changethis", "CHANGETHIS", "changeme", "password"])
def test_production_refuses_a_placeholder_database_password(
    monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    set_production(
        monkeypatch, TASKAPP_DATABASE_URL=f"postgresql://taskapp:{password}@db:5432/taskapp"
    )
    with pytest.raises(ValidationError, match="TASKAPP_DATABASE_URL") as excinfo:
        load()
    assert "placeholder" in str(excinfo.value)
    # The message names the problem, never the secret itself.
    assert f":{password}@" not in str(excinfo.value)


def test_production_refuses_a_placeholder_redis_password(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch, TASKAPP_REDIS_URL="redis://:changethis@redis:6379/0")
    with pytest.raises(ValidationError, match="TASKAPP_REDIS_URL"):
        load()


def test_production_refuses_a_placeholder_replica_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_production(monkeypatch)
    assert load().database.replica_url is None  # optional
    monkeypatch.setenv(
        "TASKAPP_DATABASE_REPLICA_URL", "postgresql://taskapp:changethis@db2/taskapp"
    )
    with pytest.raises(ValidationError, match="TASKAPP_DATABASE_REPLICA_URL"):
        load()


def test_the_replica_url_is_a_postgresql_url_for_asyncpg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_DATABASE_REPLICA_URL", "postgres://u:p@standby:5432/taskapp")
    url = load().database.replica_url
    assert url is not None
    assert url.get_secret_value() == "postgresql+asyncpg://u:p@standby:5432/taskapp"
    monkeypatch.setenv("TASKAPP_DATABASE_REPLICA_URL", "mysql://u:p@standby/taskapp")
    with pytest.raises(ValidationError, match="replica_url"):
        load()


def test_dev_accepts_a_placeholder_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_DATABASE_URL", "postgresql://postgres:changethis@localhost/db")
    assert load().database.url is not None


@pytest.mark.parametrize("missing", ["TASKAPP_DATABASE_URL", "TASKAPP_REDIS_URL"])
def test_production_requires_service_urls(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    set_production(monkeypatch, **{missing: None})
    with pytest.raises(ValidationError, match=missing):
        load()


def test_production_reports_every_problem_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(
        monkeypatch,
        TASKAPP_OIDC_ISSUER=None,
        TASKAPP_DATABASE_URL="postgresql://u:changethis@db/taskapp",
    )
    monkeypatch.setenv("TASKAPP_OIDC_TRUST_DEV_KEY", "1")
    with pytest.raises(ValidationError) as excinfo:
        load()
    message = str(excinfo.value)
    for name in ("TASKAPP_OIDC_ISSUER", "TASKAPP_OIDC_TRUST_DEV_KEY", "TASKAPP_DATABASE_URL"):
        assert name in message


def test_unknown_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_ENV", "staging")
    with pytest.raises(ValidationError, match="env"):
        load()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
        ("postgresql://u:p@db:5432/app", "postgresql+asyncpg://u:p@db:5432/app"),
        ("postgresql+psycopg://u:p@db/app", "postgresql+asyncpg://u:p@db/app"),
        (
            "postgresql+asyncpg://u:p@db/app?ssl=require",
            "postgresql+asyncpg://u:p@db/app?ssl=require",
        ),
    ],
)
def test_database_url_is_normalised_to_asyncpg(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("TASKAPP_DATABASE_URL", given)
    url = load().database.url
    assert url is not None
    assert url.get_secret_value() == expected


@pytest.mark.parametrize(
    "url", ["mysql://u:p@db/app", "sqlite:///tasks.db", "db.internal:5432/app", "http://db/app"]
)
def test_non_postgres_database_url_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("TASKAPP_DATABASE_URL", url)
    with pytest.raises(ValidationError, match="PostgreSQL"):
        load()


def test_bad_redis_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKAPP_REDIS_URL", "localhost:6379")
    with pytest.raises(ValidationError, match="redis://"):
        load()


def test_secrets_are_not_shown_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch)
    settings = load()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "s3cret-Pa55" not in text
        assert "an0ther-s3cret" not in text


@pytest.mark.parametrize(
    "issuer",
    [
        "keycloak:8080/realms/taskapp",
        "ftp://keycloak/realms/taskapp",
        "not a url",
        "https://",
        "https:///realms/taskapp",
    ],
)
def test_bad_issuer_url_is_refused(monkeypatch: pytest.MonkeyPatch, issuer: str) -> None:
    monkeypatch.setenv("TASKAPP_OIDC_ISSUER", issuer)
    with pytest.raises(ValidationError, match="issuer"):
        load()


def test_discovery_url_is_read_with_the_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://keycloak:8080/realms/taskapp/.well-known/openid-configuration"
    set_production(monkeypatch, TASKAPP_OIDC_DISCOVERY_URL=url)
    settings = load()
    assert settings.oidc.discovery_url == url
    assert settings.oidc.issuer == GOOD_ISSUER


def test_discovery_url_defaults_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    set_production(monkeypatch, TASKAPP_OIDC_DISCOVERY_URL="")
    assert load().oidc.discovery_url is None


@pytest.mark.parametrize("url", ["keycloak:8080/realms/taskapp", "file:///etc/passwd", "https://"])
def test_bad_discovery_url_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    set_production(monkeypatch, TASKAPP_OIDC_DISCOVERY_URL=url)
    with pytest.raises(ValidationError, match="discovery_url"):
        load()


def test_discovery_url_without_issuer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TASKAPP_OIDC_DISCOVERY_URL",
        "http://keycloak:8080/realms/taskapp/.well-known/openid-configuration",
    )
    with pytest.raises(ValidationError, match="TASKAPP_OIDC_DISCOVERY_URL needs"):
        load()


@pytest.mark.parametrize(
    "issuer",
    [
        "http://keycloak:8080/realms/taskapp/",
        "http://keycloak:8080/realms/taskapp//",
        "http://keycloak:8080/realms/taskapp",
    ],
)
def test_issuer_trailing_slash_is_removed(monkeypatch: pytest.MonkeyPatch, issuer: str) -> None:
    monkeypatch.setenv("TASKAPP_OIDC_ISSUER", issuer)
    assert load().oidc.issuer == "http://keycloak:8080/realms/taskapp"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TASKAPP_OIDC_JWKS_CACHE_TTL", "0"),
        ("TASKAPP_OIDC_JWKS_REFETCH_COOLDOWN", "-1"),
        ("TASKAPP_OIDC_LEEWAY", "3600"),
        ("TASKAPP_DATABASE_POOL_SIZE", "0"),
    ],
)
def test_out_of_range_numbers_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load()
