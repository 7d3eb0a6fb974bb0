"""Prometheus and Grafana in deploy/compose.yml: the compose scrape config passes promtool and
scrapes every API replica, the worker and beat with the token of the env file; Grafana is
provisioned with that Prometheus and the dashboard (tests/deploy/test_prometheus.py checks
the dashboard itself)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from tests.deploy.stack import DEPLOY, compose, filled_env
from tests.fixtures.tools import promtool

CONFIG = DEPLOY / "prometheus" / "prometheus.compose.yml"
TOKEN_FILE = "/run/prometheus/taskapp-metrics-token"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "taskapp.yml"
DASHBOARD = DEPLOY / "grafana" / "taskapp-dashboard.json"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    services: dict[str, Any] = compose(filled_env())["services"]
    return services


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> path on the host (relative to deploy/) of the bind mounts."""
    result = {}
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            result[target] = source[2:]
    return result


def test_compose_scrape_config_passes_promtool(tmp_path: Path) -> None:
    text = CONFIG.read_text()
    assert TOKEN_FILE in text
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123")
    (tmp_path / "prometheus.yml").write_text(text.replace(TOKEN_FILE, str(token)))
    (tmp_path / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text())
    result = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_api_replica_is_scraped_as_job_taskapp(services: dict[str, Any]) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = config["scrape_configs"]
    # The alert rules and the dashboard select job="taskapp".
    assert job["job_name"] == "taskapp"
    assert 'job="taskapp"' in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert job["metrics_path"] == "/metrics"
    # One target per replica: Docker's DNS answers the service name with every container.
    discovery = {name: sd for sd in job["dns_sd_configs"] for name in sd["names"]}
    assert all(sd["type"] == "A" for sd in discovery.values())
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["api"]["command"][services["api"]["command"].index("--port") + 1] == str(
        discovery["api"]["port"]
    )
    assert "static_configs" not in job
    assert config["rule_files"] == ["alerts.yml"]


def test_the_worker_and_beat_are_scraped_on_their_own_metrics_port(
    services: dict[str, Any],
) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = config["scrape_configs"]
    discovery = {name: sd for sd in job["dns_sd_configs"] for name in sd["names"]}
    # Every taskapp process that runs on: the one-shot migration has nothing to scrape.
    assert set(discovery) == {"api", "worker", "beat"}
    for name in ("worker", "beat"):
        service = services[name]
        port = service["environment"]["TASKAPP_WORKER_METRICS_PORT"]
        assert discovery[name]["port"] == int(port), name
        # Reachable by Prometheus on the compose network, published nowhere.
        assert [str(p) for p in service["expose"]] == [port], name
        assert "ports" not in service, name
        # The listener's token is the scrape token of the API, which Prometheus sends.
        assert (
            service["environment"]["TASKAPP_METRICS_TOKEN"]
            == services["prometheus"]["environment"]["TASKAPP_METRICS_TOKEN"]
        )
    # Series say which process they come from: the name the target was found under.
    assert {
        "source_labels": ["__meta_dns_name"],
        "target_label": "component",
    } in job["relabel_configs"]


def test_prometheus_reads_the_token_of_the_env_file_from_a_private_file(
    services: dict[str, Any],
) -> None:
    prometheus = services["prometheus"]
    config = yaml.safe_load(CONFIG.read_text())
    assert config["scrape_configs"][0]["authorization"] == {
        "type": "Bearer",
        "credentials_file": TOKEN_FILE,
    }
    assert (
        prometheus["environment"]["TASKAPP_METRICS_TOKEN"] == filled_env()["TASKAPP_METRICS_TOKEN"]
    )
    assert prometheus["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = prometheus["command"]
    words = shlex.split(script)
    assert words[:3] == ["umask", "077", "&&"]
    assert f"> {TOKEN_FILE}" in script or f">{TOKEN_FILE}" in script
    assert '"$TASKAPP_METRICS_TOKEN"' in script  # $$ in the file: expanded by the shell
    assert "exec /bin/prometheus" in script
    assert "--config.file=/etc/prometheus/prometheus.yml" in words
    assert str(Path(TOKEN_FILE).parent) in prometheus["tmpfs"]
    assert mounts(prometheus) == {
        "/etc/prometheus/prometheus.yml": "prometheus/prometheus.compose.yml",
        "/etc/prometheus/alerts.yml": "prometheus/alerts.yml",
    }


def test_grafana_is_provisioned_with_the_stacks_prometheus(services: dict[str, Any]) -> None:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services
    assert datasource["isDefault"] is True
    # The dashboard's data source variable picks a Prometheus data source, the default one.
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["query"] == datasource["type"]

    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning/datasources"] == "grafana/provisioning/datasources"
    assert grafana["/etc/grafana/provisioning/dashboards"] == "grafana/provisioning/dashboards"


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it(
    services: dict[str, Any],
) -> None:
    (provider,) = yaml.safe_load(DASHBOARDS.read_text())["providers"]
    assert provider["type"] == "file"
    directory = provider["options"]["path"]
    grafana = mounts(services["grafana"])
    dashboards = {
        target: source
        for target, source in grafana.items()
        if Path(target).parent == Path(directory)
    }
    assert dashboards == {f"{directory}/taskapp-dashboard.json": "grafana/taskapp-dashboard.json"}
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards
