"""`taskapp worker` and `taskapp beat`: the Celery processes that deliver events."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from taskapp.cli.serve import own_metrics_directory
from taskapp.cli.settings import load_settings, missing_settings
from taskapp.config import Settings


def _worker_settings() -> Settings:
    settings = load_settings()
    missing = missing_settings(
        TASKAPP_DATABASE_URL=settings.database.url,
        **{"TASKAPP_BROKER_URL or TASKAPP_REDIS_URL": settings.celery_broker_url},
        TASKAPP_SMTP_URL=settings.smtp.url,
    )
    if missing:
        sys.exit(f"taskapp worker needs {missing}")
    return settings


@contextlib.contextmanager
def _metrics_listener(settings: Settings, *, pool: bool) -> Iterator[None]:
    """With TASKAPP_WORKER_METRICS_PORT, this process serves GET /metrics until it ends.

    `pool`: Celery's pool processes record the values (prefork), so they write them to a
    metrics directory of this worker's own, and a scrape reports their totals. Enter this
    before anything imports prometheus_client: it picks its storage on first import.
    """
    config = settings.worker
    if config.metrics_port is None:
        yield
        return
    if settings.is_production and settings.metrics_token is None:
        sys.exit(
            "taskapp: TASKAPP_WORKER_METRICS_PORT needs TASKAPP_METRICS_TOKEN in production "
            "(the token that may read the metrics)"
        )
    with contextlib.ExitStack() as stack:
        if pool:
            stack.enter_context(own_metrics_directory())
        from taskapp.observability.metrics_server import start_metrics_server
        from taskapp.observability.scrape import process_registry, scrape_registry

        try:
            server = start_metrics_server(
                config.metrics_host,
                config.metrics_port,
                scrape_registry if pool else process_registry,
                settings.metrics_token,
            )
        except OSError as exc:
            where = f"{config.metrics_host}:{config.metrics_port}"
            sys.exit(f"taskapp: cannot serve metrics on {where}: {exc.strerror or exc}")
        stack.callback(server.close)
        yield


def cmd_worker(args: argparse.Namespace) -> None:
    """Celery worker that delivers events (the e-mails), with the outbox sweep (beat) inside."""
    settings = _worker_settings()
    with _metrics_listener(settings, pool=True):
        from taskapp.events.worker import create_worker

        argv = [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={args.concurrency}",
            f"--pool={args.pool}",
            f"--queues={settings.notifications.queue}",
        ]
        if not args.no_beat:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            schedule = settings.data_dir.resolve() / "celerybeat-schedule"
            argv += ["--beat", f"--schedule={schedule}"]
        create_worker(settings).worker_main(argv)


def cmd_beat(args: argparse.Namespace) -> None:
    """Only the outbox sweep scheduler, for deployments that run beat on its own (once)."""
    settings = _worker_settings()
    # Beat records no taskapp metric (the sweep it schedules runs in a worker): its
    # listener reports the process itself, and so that it is up.
    with _metrics_listener(settings, pool=False):
        from taskapp.events.worker import create_worker

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        schedule = settings.data_dir.resolve() / "celerybeat-schedule"
        create_worker(settings).start(
            ["beat", f"--loglevel={settings.log_level}", f"--schedule={schedule}"]
        )
