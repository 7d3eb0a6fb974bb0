"""deploy/compose.yml: Compose accepts it, it describes the stack the README promises, and
its secrets come from the env file only.

`docker-compose config` (Debian's docker-compose 1.29; CI installs it) validates the file
against the Compose specification and resolves it; no container is started (there is no
Docker engine where the tests run).
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from taskapp.config import Settings
from tests.deploy.stack import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    MissingVariableError,
    compose,
    compose_variables,
    env_example,
    filled_env,
    healthcheck_disabled,
    published_ports,
)
from tests.fixtures.tools import docker_compose

SERVICES = {
    "postgres",
    "redis",
    "keycloak",
    "mailpit",
    "migrate",
    "api",
    "worker",
    "beat",
    "nginx",
    "prometheus",
    "grafana",
}
TASKAPP_SERVICES = {"migrate", "api", "worker", "beat"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
URL_PASSWORD = re.compile(r"^[\w+]+://[^:/@\s]*:([^@\s]*)@")


def run_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker_compose(), "--file", str(COMPOSE_FILE), "--env-file", str(env_file), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Nothing from the caller's shell may fill in a variable the env file leaves empty.
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")},
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`docker-compose config` of the file with the example's secrets filled in."""
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in filled_env().items()))
    result = run_config(env_file)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    return document


# --- docker-compose config -----------------------------------------------------------------


def test_compose_accepts_the_file_and_resolves_every_service(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == SERVICES
    for name in TASKAPP_SERVICES:
        assert services[name]["image"] == "taskapp:local", name
        assert services[name]["build"]["context"] == str(ROOT), name
        assert services[name]["build"]["dockerfile"] == "Dockerfile", name


def test_the_api_runs_as_two_replicas_behind_nginx(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    api = services["api"]
    assert api["deploy"]["replicas"] == 2
    assert api["command"][:2] == ["taskapp", "serve"]
    assert "ports" not in api, "replicas are reached through nginx only"
    assert "container_name" not in api, "a fixed name allows one container only"
    assert published_ports(services["nginx"]) == [("127.0.0.1", 8000, 80)]
    assert services["nginx"]["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = {volume.split(":")[1] for volume in services["nginx"]["volumes"]}
    assert "/etc/nginx/conf.d/default.conf" in mounts


def test_migrations_run_once_before_the_api_and_the_workers(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["taskapp", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "beat"):
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_worker_and_beat_are_separate_and_beat_runs_once(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert services["worker"]["command"][:3] == ["taskapp", "worker", "--no-beat"]
    assert services["beat"]["command"] == ["taskapp", "beat"]
    assert "replicas" not in services["beat"].get("deploy", {})


def test_services_have_healthchecks(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    for name in ("postgres", "redis", "keycloak", "worker", "nginx", "prometheus", "grafana"):
        assert not healthcheck_disabled(services[name]), name
        assert services[name]["healthcheck"]["test"][0] in {"CMD", "CMD-SHELL"}, name
    # The API keeps the image's HEALTHCHECK (GET /healthz; see tests/deploy/test_dockerfile.py);
    # one-shot and HTTP-less containers of the same image must not inherit it.
    assert "healthcheck" not in services["api"]
    assert healthcheck_disabled(services["migrate"])
    assert healthcheck_disabled(services["beat"])
    # Readiness over TCP: during initialisation PostgreSQL listens on its socket only.
    assert "--host=127.0.0.1" in services["postgres"]["healthcheck"]["test"]


def test_published_ports_listen_on_loopback_only(resolved: dict[str, Any]) -> None:
    published = {
        name: published_ports(service)
        for name, service in resolved["services"].items()
        if service.get("ports")
    }
    assert {name: [p[1] for p in ports] for name, ports in published.items()} == {
        "nginx": [8000],
        "keycloak": [8080],
        "mailpit": [8025],
        "prometheus": [9090],
        "grafana": [3000],
    }
    for name, ports in published.items():
        assert all(address == "127.0.0.1" for address, _, _ in ports), name


def test_the_secrets_of_the_env_file_reach_the_services(resolved: dict[str, Any]) -> None:
    env = filled_env()
    services = resolved["services"]
    api = services["api"]["environment"]
    assert f":{env['TASKAPP_DB_PASSWORD']}@postgres:5432/taskapp" in api["TASKAPP_DATABASE_URL"]
    assert f":{env['REDIS_PASSWORD']}@redis:6379/0" in api["TASKAPP_REDIS_URL"]
    assert api["TASKAPP_METRICS_TOKEN"] == env["TASKAPP_METRICS_TOKEN"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    keycloak = services["keycloak"]["environment"]
    assert keycloak["KC_DB_PASSWORD"] == env["KEYCLOAK_DB_PASSWORD"]
    assert keycloak["KC_BOOTSTRAP_ADMIN_PASSWORD"] == env["KEYCLOAK_ADMIN_PASSWORD"]
    assert keycloak["DEMO_ALICE_PASSWORD"] == env["DEMO_ALICE_PASSWORD"]
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == env["GRAFANA_ADMIN_PASSWORD"]
    for name in TASKAPP_SERVICES:
        assert services[name]["environment"] == api, f"{name} reads other settings than the API"


def test_compose_refuses_to_start_while_a_secret_is_empty(tmp_path: Path) -> None:
    result = run_config(ENV_EXAMPLE)  # the example as committed: every secret empty
    assert result.returncode != 0
    assert re.search(r"set \w+ in deploy/\.env", result.stderr), result.stderr

    # One secret missing is enough.
    env = filled_env()
    env["GRAFANA_ADMIN_PASSWORD"] = ""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    result = run_config(env_file)
    assert result.returncode != 0
    assert "set GRAFANA_ADMIN_PASSWORD in deploy/.env" in result.stderr


# --- the file itself -----------------------------------------------------------------------


def test_the_env_example_declares_exactly_the_variables_of_the_compose_file() -> None:
    assert compose_variables(COMPOSE_FILE.read_text()) == set(env_example())


def test_the_env_example_commits_no_secret() -> None:
    for name, value in env_example().items():
        if SECRET_NAME.search(name):
            assert value == "", f"{name} has a value in the committed example"


def test_every_secret_in_the_compose_file_is_a_required_variable() -> None:
    # Read raw: each secret-looking value must be ${VAR:?...}, never a literal.
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    required = re.compile(r"^\$\{\w+:\?[^}]+\}$")
    environments = [document["x-taskapp-environment"]] + [
        service["environment"]
        for service in document["services"].values()
        if isinstance(service.get("environment"), dict)
    ]
    checked = 0
    for environment in environments:
        for name, value in environment.items():
            value = str(value)
            if SECRET_NAME.search(name):
                assert required.match(value), f"{name}: {value!r} is not ${{VAR:?...}}"
                checked += 1
            if match := URL_PASSWORD.match(value):
                assert required.match(match.group(1)), f"{name}: password in the URL"
                checked += 1
    assert checked >= 12


def test_the_real_env_file_is_ignored_by_git() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--quiet", "deploy/.env"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if result.returncode == 128:
        pytest.skip("not a git checkout")
    assert result.returncode == 0, "deploy/.env would be committed"


def test_interpolation_requires_every_secret() -> None:
    with pytest.raises(MissingVariableError, match="TASKAPP_DB_PASSWORD"):
        compose({**filled_env(), "TASKAPP_DB_PASSWORD": ""})


# --- the settings taskapp gets ---------------------------------------------------------------


@pytest.fixture
def taskapp_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The API's environment in the stack, and no other TASKAPP_* variable or .env file."""
    for name in list(os.environ):
        if name.startswith("TASKAPP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    environment: dict[str, str] = compose(filled_env())["services"]["api"]["environment"]
    return environment


def load_settings(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> Settings:
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value))
    return Settings(_env_file=None)


def test_the_stack_passes_the_production_checks(
    monkeypatch: pytest.MonkeyPatch, taskapp_environment: dict[str, str]
) -> None:
    settings = load_settings(monkeypatch, taskapp_environment)
    assert settings.is_production
    assert settings.database.url is not None
    assert settings.database.url.get_secret_value().startswith("postgresql+asyncpg://taskapp:")
    assert settings.celery_broker_url is not None
    assert settings.celery_broker_url.endswith("@redis:6379/1")
    assert settings.smtp.url is not None
    assert settings.oidc.issuer == "http://localhost:8080/realms/taskapp"
    assert settings.oidc.discovery_url is not None
    assert settings.oidc.discovery_url.startswith("http://keycloak:8080/")
    # The worker and beat serve their metrics, which production allows with the token only.
    assert settings.worker.metrics_port == 9540
    assert settings.metrics_token is not None
    # Docker gives the compose network a private range; nginx's address in it is trusted.
    network = ipaddress.ip_network("172.18.0.0/16")
    assert any(network.subnet_of(trusted) for trusted in settings.ratelimit.trusted_networks)  # type: ignore[arg-type]


def test_a_placeholder_password_in_the_env_file_stops_the_service(
    monkeypatch: pytest.MonkeyPatch, taskapp_environment: dict[str, str]
) -> None:
    env = {**filled_env(), "TASKAPP_DB_PASSWORD": "changethis"}
    environment = compose(env)["services"]["api"]["environment"]
    with pytest.raises(ValidationError, match="placeholder password"):
        load_settings(monkeypatch, environment)
