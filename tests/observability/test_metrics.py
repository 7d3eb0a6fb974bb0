"""/metrics: access, format, database health, request metrics and multiprocess totals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pgserver
import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskapp.app import create_app
from taskapp.observability.scrape import forget_dead_processes
from testing.oidc import OIDCProvider
from testing.processes import clean_env, running_server
from testing.services import free_port
from tests.conftest import SettingsFactory, running
from tests.fixtures.tools import promtool

SCRAPE_TOKEN = "scrape-" + uuid.uuid4().hex


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert response.status_code == 200, response.text
    return response.text


async def test_metrics_need_a_role_or_the_scrape_token(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    async with running(create_app(make_settings(metrics_token=SCRAPE_TOKEN))) as client:
        assert (await client.get("/metrics")).status_code == 401
        bad = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401
        no_role = await client.get("/metrics", headers=oidc.auth("alice", roles=[]))
        assert no_role.status_code == 403
        user = await client.get("/metrics", headers=oidc.auth("alice"))
        assert user.status_code == 200
        assert user.headers["content-type"].startswith("text/plain")
        assert "db_up" in user.text
        text = await scrape(client)
        for name in ("python_gc_objects_collected_total", "python_info", "db_pool_size"):
            assert name in text
        openmetrics = await client.get(
            "/metrics",
            headers={
                "Authorization": f"Bearer {SCRAPE_TOKEN}",
                "Accept": "application/openmetrics-text; version=1.0.0",
            },
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")


async def test_both_exposition_formats_are_documented(client: httpx.AsyncClient):
    # The OpenMetrics answer was served but undocumented (found by `make fuzz`).
    schema = (await client.get("/openapi.json")).json()
    served = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(served) == {"text/plain", "application/openmetrics-text"}


async def test_a_real_scrape_passes_promtool(make_settings: SettingsFactory, oidc: OIDCProvider):
    promtool_path = promtool()
    async with running(create_app(make_settings(metrics_token=SCRAPE_TOKEN))) as client:
        await client.get("/tasks", headers=oidc.auth("alice"))
        text = await scrape(client)
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool_path, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_request_metrics_use_route_templates(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    async with running(create_app(make_settings(metrics_token=SCRAPE_TOKEN))) as client:
        before = await scrape(client)
        for _ in range(3):
            await client.get(f"/tasks/{uuid.uuid4()}", headers=oidc.auth("alice"))
        await client.get("/no/such/path")
        after = await scrape(client)
    labels = {"method": "GET", "route": "/tasks/{task_id}", "status": "404"}
    assert (
        samples(after, "http_requests_total", **labels)
        - samples(before, "http_requests_total", **labels)
        == 3
    )
    assert samples(after, "http_requests_total", route="unmatched") >= 1
    assert "/no/such/path" not in after
    assert samples(after, "http_request_duration_seconds_count", route="/tasks/{task_id}") >= 3
    assert samples(after, "db_query_latency_seconds_count", operation="select") > samples(
        before, "db_query_latency_seconds_count", operation="select"
    )


async def test_db_up_follows_the_database_and_errors_are_counted(
    make_settings: SettingsFactory, oidc: OIDCProvider, private_postgres: tuple[str, Path]
):
    url, data_dir = private_postgres
    settings = make_settings(
        metrics_token=SCRAPE_TOKEN, database={"url": url, "connect_timeout": 2}
    )
    async with running(create_app(settings)) as client:
        assert samples(await scrape(client), "db_up") == 1
        errors_before = samples(await scrape(client), "db_errors_total")

        await asyncio.to_thread(pgserver.get_server(data_dir.resolve()).cleanup)  # stop
        assert (await client.get("/tasks", headers=oidc.auth("alice"))).status_code == 503
        down = await scrape(client)
        assert samples(down, "db_up") == 0
        assert samples(down, "db_errors_total") > errors_before

        await asyncio.to_thread(pgserver.get_server, data_dir.resolve(), "stop")
        assert samples(await scrape(client), "db_up") == 1


@pytest.mark.slow
def test_several_workers_report_totals_and_log_json_lines(
    tmp_path: Path, database_url: str, redis_url: str, oidc: OIDCProvider
):
    port = free_port()
    env = clean_env(
        TASKAPP_DATABASE_URL=database_url,
        TASKAPP_REDIS_URL=redis_url,
        TASKAPP_REDIS_KEY_PREFIX=f"test-{uuid.uuid4().hex}:",
        TASKAPP_OIDC_ISSUER=oidc.issuer,
        TASKAPP_METRICS_TOKEN=SCRAPE_TOKEN,
        TASKAPP_RATE_LIMIT="1000000/second",
        TASKAPP_NOTIFICATIONS_ENABLED="false",
        TASKAPP_LOG_FORMAT="json",
    )
    # A metrics directory given by the operator, holding counts from an earlier run...
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    _in_metrics_dir(metrics_dir, "HTTP_REQUESTS.labels('GET', '/tasks', '200').inc(1000)")
    requests = 60
    token = oidc.token("metrics-user")
    with running_server(["serve", "--workers", "4"], env, port, tmp_path):
        # ...and a Celery worker on the same host, writing its counters there too.
        worker = _in_metrics_dir(
            metrics_dir,
            "NOTIFICATIONS.labels('sent').inc(); import time; time.sleep(60)",
            wait=False,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(requests):  # a new connection each time: any worker may answer
            response = httpx.get(
                f"{base}/tasks", headers={"Authorization": f"Bearer {token}", "Connection": "close"}
            )
            assert response.status_code == 200
        traced = httpx.get(f"{base}/healthz", headers={"X-Request-ID": "trace-me-123"})
        assert traced.headers["X-Request-ID"] == "trace-me-123"
        text = httpx.get(
            f"{base}/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}
        ).text
        worker.kill()
    # The earlier run's counts were reset at start; the worker's counter is included; the
    # worker, which never probes the database, does not drag db_up down.
    counted = samples(text, "http_requests_total", method="GET", route="/tasks", status="200")
    assert counted == requests
    assert samples(text, "taskapp_notifications_total", outcome="sent") == 1
    assert samples(text, "db_up") == 1

    # Every line is JSON, the server's own (workers started, stopped) included.
    lines = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    access = [line for line in lines if line.get("logger") == "taskapp.access"]
    task_lines = [line for line in access if line["route"] == "/tasks"]
    assert len(task_lines) == requests
    for line in task_lines:
        assert line["status"] == 200
        assert line["method"] == "GET"
        assert line["subject"] == "metrics-user"
        assert len(line["request_id"]) >= 16
        assert line["duration_ms"] >= 0
    assert any(line.get("request_id") == "trace-me-123" for line in access)
    assert token not in (tmp_path / "server.log").read_text()
    assert SCRAPE_TOKEN not in (tmp_path / "server.log").read_text()


async def test_each_request_has_one_access_record(
    client: httpx.AsyncClient, oidc: OIDCProvider, caplog: pytest.LogCaptureFixture
):
    caplog.set_level("INFO", logger="taskapp.access")
    response = await client.get("/tasks", headers=oidc.auth("alice"))
    assert response.status_code == 200
    [record] = [r for r in caplog.records if r.name == "taskapp.access"]
    fields = record.__dict__
    assert (fields["method"], fields["route"], fields["status"]) == ("GET", "/tasks", 200)
    assert fields["subject"] == "alice"
    assert fields["duration_ms"] >= 0


async def test_no_access_record_when_the_access_log_is_off(
    make_settings: SettingsFactory, oidc: OIDCProvider, caplog: pytest.LogCaptureFixture
):
    caplog.set_level("DEBUG", logger="taskapp.access")
    async with running(create_app(make_settings(access_log=False))) as client:
        response = await client.get("/tasks", headers=oidc.auth("alice"))
        scrape = await client.get("/metrics", headers=oidc.auth("alice"))
    assert response.status_code == 200
    assert not [r for r in caplog.records if r.name == "taskapp.access"]
    # The request is still counted.
    counted = samples(scrape.text, "http_requests_total", method="GET", route="/tasks")
    assert counted >= 1


def test_live_gauges_of_dead_workers_are_forgotten(tmp_path: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    files = {
        name: tmp_path / name
        for name in (
            f"gauge_livesum_{dead.pid}.db",  # a crashed worker's pool gauge
            f"gauge_livesum_{os.getpid()}.db",  # a living worker's
            f"counter_{dead.pid}.db",  # counters of the dead still count
        )
    }
    for path in files.values():
        path.write_bytes(b"")
    forget_dead_processes(str(tmp_path))
    assert {path.name for path in tmp_path.iterdir()} == {
        f"gauge_livesum_{os.getpid()}.db",
        f"counter_{dead.pid}.db",
    }


def _in_metrics_dir(directory: Path, code: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
    """Run `code` in a process writing metrics to `directory` (names from metrics.py)."""
    process = subprocess.Popen(
        [sys.executable, "-c", f"from taskapp.observability.metrics import *; {code}"],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
    )
    if wait:
        assert process.wait(timeout=30) == 0
    return process


async def test_the_scrape_is_never_rate_limited(make_settings: SettingsFactory):
    settings = make_settings(metrics_token=SCRAPE_TOKEN, ratelimit={"anonymous": "1/minute"})
    async with running(create_app(settings)) as client:
        assert (await client.get("/tasks")).status_code == 401
        assert (await client.get("/tasks")).status_code == 429  # the anonymous budget is gone
        for _ in range(5):
            await scrape(client)
