"""Deploy artefacts for Prometheus and Grafana: the scrape config, the alert rules and their
unit tests pass promtool, and the rules and the dashboard only query metrics the service exports.

promtool comes with Debian's `prometheus` package; CI installs it. Without it these tests fail
(they do not skip): an unchecked alert file is how alerts silently stop working.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from tests.fixtures.tools import promtool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "taskapp-dashboard.json"

PRODUCTION_TOKEN_FILE = "/etc/prometheus/taskapp-metrics-token"

# The metric families the service exports (counters with their _total sample name).
COUNTERS = {
    "db_errors_total",
    "http_requests_total",
    "taskapp_notifications_total",
    "taskapp_rate_limit_decisions_total",
    "taskapp_cache_requests_total",
    "taskapp_cache_errors_total",
}
GAUGES = {"db_up", "taskapp_outbox_pending"}
HISTOGRAMS = {"db_query_latency_seconds", "http_request_duration_seconds"}
KNOWN_METRICS = (
    COUNTERS
    | GAUGES
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)

EXPECTED_ALERTS = {
    "TaskappDatabaseDown",
    "TaskappHighErrorRate",
    "TaskappHighLatencyP99",
    "TaskappOutboxBacklog",
    "TaskappRateLimitSurge",
}

# PromQL words that look like identifiers but are not metric names.
_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)  # label lists of by/without/on/ignoring/group_*
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]?\b", " ", text)  # numbers, durations
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _PROMQL_WORDS:
            continue  # a function call or a keyword
        names.add(name)
    return names


def test_metric_name_extraction() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (route, le) ("
        'rate(http_request_duration_seconds_bucket{job=~"$job", route!="/metrics"}'
        "[$__rate_interval]))) > 1 and on (job) db_up == 0"
        ' or absent(nonexistent_metric{job="taskapp"}) unless sum without (pid) (x_total offset 5m)'
    )
    assert metric_names(expr) == {
        "http_request_duration_seconds_bucket",
        "db_up",
        "nonexistent_metric",
        "x_total",
    }


# --- promtool ------------------------------------------------------------------------------


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    config_text = PROMETHEUS_CONFIG.read_text()
    # The committed config is production-shaped: the token comes from a file Prometheus reads.
    # promtool checks that file exists, so check a copy that points at a temporary one.
    assert PRODUCTION_TOKEN_FILE in config_text
    token_file = tmp_path / "taskapp-metrics-token"
    token_file.write_text("test-metrics-token\n")
    token_file.chmod(0o600)
    (tmp_path / "prometheus.yml").write_text(
        config_text.replace(PRODUCTION_TOKEN_FILE, str(token_file))
    )
    shutil.copy(ALERTS, tmp_path / "alerts.yml")

    result = run_promtool("check", "config", tmp_path / "prometheus.yml")
    assert "1 rule files found" in result.stdout + result.stderr


def test_scrape_config_scrapes_taskapp_with_bearer_token_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["taskapp"]
    assert job.get("scheme", "http") == "http"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": PRODUCTION_TOKEN_FILE,
    }
    assert "credentials" not in job["authorization"]  # no secret in the repository
    targets = {static["labels"]["component"]: static["targets"] for static in job["static_configs"]}
    # The API on its HTTP port, the worker and beat on TASKAPP_WORKER_METRICS_PORT.
    assert targets == {
        "api": ["taskapp:8000"],
        "worker": ["taskapp-worker:9540"],
        "beat": ["taskapp-beat:9540"],
    }


def test_alert_rules_pass_promtool_check() -> None:
    run_promtool("check", "rules", ALERTS.relative_to(ROOT))


def test_alert_rules_pass_their_unit_tests() -> None:
    run_promtool("test", "rules", ALERTS_TEST.relative_to(ROOT))


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no offline "check this expression"; a recording rule per query does it.
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}
    rules = []
    for index, expr in enumerate(dashboard_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", rule_file)


# --- alert rules ---------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alerts_are_the_expected_ones_with_severity_and_annotations() -> None:
    rules = alert_rules()
    assert all("alert" in rule for rule in rules), "alerts.yml holds alerting rules only"
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert "for" in rule, f"{rule['alert']} has no `for:`: one bad scrape would page"


def test_alerts_use_only_exported_metrics() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"{rule['alert']} uses metrics the service does not export: {unknown}"
        used |= names
    assert {
        "db_up",
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "taskapp_outbox_pending",
        "taskapp_notifications_total",
        "taskapp_rate_limit_decisions_total",
    } <= used


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    document = yaml.safe_load(ALERTS_TEST.read_text())
    assert document["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        assert case["input_series"], case["name"]
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


# --- Grafana dashboard ---------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels of collapsed rows
    return panels


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in all_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable() -> None:
    data = dashboard()
    assert data["title"]
    assert data["uid"]
    assert 36 <= data["schemaVersion"] <= 41
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = all_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_dashboard_uses_only_exported_metrics() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"no metric found in dashboard query {expr!r}"
        unknown = names - KNOWN_METRICS
        assert not unknown, f"dashboard query uses metrics the service does not export: {unknown}"
        used |= names
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"unexpected variable query {query!r}"
            assert metric_names(inner.group(1)) <= KNOWN_METRICS, query
    # Every exported family has a panel.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert families >= COUNTERS | GAUGES | HISTOGRAMS


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = dashboard_exprs()

    def has(*fragments: str) -> bool:
        return any(all(f in expr for f in fragments) for expr in exprs)

    assert has("http_requests_total", "by (route, status)")
    for quantile in ("0.5", "0.95", "0.99"):
        assert has(
            f"histogram_quantile({quantile}", "http_request_duration_seconds_bucket", "route"
        )
    assert has("http_requests_total", 'status=~"5.."')
    assert has("db_up")
    assert has("histogram_quantile(0.99", "db_query_latency_seconds_bucket", "operation")
    assert has("db_errors_total", "by (error)")
    assert has('taskapp_cache_requests_total{job=~"$job", instance=~"$instance", result="hit"}')
    assert has("taskapp_rate_limit_decisions_total", "by (kind, decision)")
    assert has("taskapp_outbox_pending")
    assert has("taskapp_notifications_total", "by (outcome)")


def test_the_workers_metrics_are_not_filtered_by_the_api_instance() -> None:
    # The Instance variable lists the targets with HTTP metrics, the API's; the worker (its own
    # target, component="worker") reports these, so picking an API instance would empty them.
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert "http_requests_total" in variables["instance"]["definition"]
    worker_exprs = [
        expr
        for expr in dashboard_exprs()
        if {"taskapp_outbox_pending", "taskapp_notifications_total"} & metric_names(expr)
    ]
    assert len(worker_exprs) >= 2
    for expr in worker_exprs:
        assert "$instance" not in expr, expr
        assert 'job=~"$job"' in expr, expr
