"""`taskapp worker` and `taskapp beat` serve their own metrics (TASKAPP_WORKER_METRICS_PORT):
a real prefork worker counts what its pool processes did, behind the scrape token, and beat
answers for itself. Real processes, a real broker, a real SMTP server."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.polling import eventually
from testing.processes import Worker
from testing.services import free_port
from tests.events.conftest import Delivery

pytestmark = pytest.mark.slow

SCRAPE_TOKEN = "worker-scrape-token-0123456789"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(
    port: int, token: str | None = SCRAPE_TOKEN, path: str = "/metrics"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{port}{path}", headers=headers)


async def samples(port: int) -> Samples:
    """Every sample of an authorized scrape, by name and labels."""
    response = await scrape(port)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def notifications(values: Samples, outcome: str) -> float:
    return values.get(("taskapp_notifications_total", (("outcome", outcome),)), 0.0)


def live_gauge_pids(directory: Path) -> set[int]:
    """The processes with live gauges (the outbox backlog) in a metrics directory."""
    return {
        int(match.group(1))
        for path in directory.iterdir()
        if (match := re.fullmatch(r"gauge_live\w+_(\d+)\.db", path.name))
    }


async def test_a_prefork_worker_serves_what_its_pool_processes_counted(
    delivery: Delivery, tmp_path: Path
) -> None:
    port = free_port()
    # The container's metrics directory, with a file a previous run of it left behind.
    metrics_dir = tmp_path / "worker-metrics"
    metrics_dir.mkdir()
    stale = metrics_dir / "counter_4242.db"
    stale.write_bytes(b"left by the previous container")
    worker = delivery.start_worker(
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        TASKAPP_WORKER_METRICS_PORT=str(port),
        TASKAPP_WORKER_METRICS_HOST="127.0.0.1",
        TASKAPP_METRICS_TOKEN=SCRAPE_TOKEN,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    assert not stale.exists(), "totals must start from zero"

    # Only the scrape token reads the metrics.
    for token in (None, "wrong-token", f"{SCRAPE_TOKEN}x"):
        refused = await scrape(port, token)
        assert refused.status_code == 401, token
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json() == {"detail": "Not authenticated", "code": "not_authenticated"}
    assert (await scrape(port, path="/")).status_code == 404

    # The mail server is down: a pool process fails and retries, and the sweep (run by a
    # pool process too) counts the row as pending.
    task_id, _ = await delivery.create("Counted by the worker")

    async def backlog_seen() -> bool:
        values = await samples(port)
        pending = values.get(("taskapp_outbox_pending", ()))
        return pending == 1 and notifications(values, "retried") >= 1

    await eventually(backlog_seen, "the pending notification and a retry in the worker's metrics")

    delivery.mail.start()
    await delivery.wait_row(task_id, "sent")

    async def sent_counted() -> bool:
        values = await samples(port)
        pending = values.get(("taskapp_outbox_pending", ()))
        return notifications(values, "sent") == 1 and pending == 0

    await eventually(sent_counted, "the sent notification and an empty outbox")
    values = await samples(port)
    assert notifications(values, "failed") == 0
    # The main process answers the scrape; its pool processes did the work.
    assert ("process_start_time_seconds", ()) in values
    pool_pids = live_gauge_pids(metrics_dir) - {worker.process.pid}
    assert pool_pids, "no pool process recorded a value"

    # A warm shutdown: each pool process takes its live gauges with it as it exits.
    worker.process.terminate()
    worker.process.wait(timeout=20)
    assert not live_gauge_pids(metrics_dir) & pool_pids


async def test_beat_serves_its_own_process_metrics_behind_the_token(
    delivery: Delivery, tmp_path: Path
) -> None:
    port = free_port()
    env = delivery.worker_env(
        TASKAPP_WORKER_METRICS_PORT=str(port),
        TASKAPP_WORKER_METRICS_HOST="127.0.0.1",
        TASKAPP_METRICS_TOKEN=SCRAPE_TOKEN,
    )
    beat = Worker([], env, tmp_path / "beat", command="beat")
    delivery.workers.append(beat)  # stopped with the pipeline

    async def answers() -> bool:
        assert beat.process.poll() is None, beat.output()
        try:
            return (await scrape(port, None)).status_code == 401
        except httpx.TransportError:
            return False

    await eventually(answers, "beat's metrics port to answer, and refuse a scrape without token")
    values = await samples(port)
    assert values[("process_start_time_seconds", ())] > 0
    # Beat records no taskapp metric (the sweep runs in a worker): it must not report one
    # either, or its zero backlog would stand beside the worker's real one.
    assert not [name for name, _ in values if name.startswith("taskapp_")]

    # Beat goes on scheduling the sweep, and the listener goes on answering beside it.
    async def scheduled() -> bool:
        assert beat.process.poll() is None, beat.output()
        return "Sending due task sweep-outbox" in beat.output()

    await eventually(scheduled, "beat to schedule the outbox sweep")
    assert (await scrape(port)).status_code == 200
