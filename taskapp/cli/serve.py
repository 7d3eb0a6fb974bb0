"""`taskapp serve`: the API under uvicorn, as production runs it."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskapp.cli.settings import load_settings, missing_settings
from taskapp.config import Settings

APP = "taskapp.app:create_app"


@contextlib.contextmanager
def metrics_directory() -> Iterator[None]:
    """Metrics of all processes started from here meet in one directory, fresh for each
    start (so counters never carry over from a previous run) and removed afterwards."""
    directory = tempfile.mkdtemp(prefix="taskapp-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def own_metrics_directory() -> Iterator[None]:
    """The metrics directory of this process and those it starts: PROMETHEUS_MULTIPROC_DIR
    when given (a container's; emptied, so totals start from zero), else a fresh one."""
    preset = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if preset:
        for stale in Path(preset).glob("*.db"):
            stale.unlink(missing_ok=True)
        yield
    else:
        with metrics_directory():
            yield


def serve_app(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve the application the way `taskapp serve` does."""
    import uvicorn

    from taskapp.http.server import HTTP_PROTOCOL, run_workers
    from taskapp.observability.logging import configure_logging

    # The supervisor's own lines (workers started, restarted, stopped) go through the same
    # formatter as the workers'; uvicorn's loggers then propagate to it.
    configure_logging(settings.log_level, json_lines=settings.json_logs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(own_metrics_directory())
        options: dict[str, Any] = {
            "factory": True,
            "host": host,
            "port": port,
            "workers": workers,
            "http": HTTP_PROTOCOL,  # TCP_NODELAY on every connection, whatever the loop
            "log_level": settings.log_level.lower(),
            "log_config": None,  # keep the logging set up above
            "server_header": False,
            # X-Forwarded-For is read by the rate limiter, from TASKAPP_TRUSTED_PROXIES only
            # (ratelimit.middleware.client_ip). uvicorn's own reading would believe any peer
            # on loopback (FORWARDED_ALLOW_IPS) and hand the app that peer's choice of
            # client address.
            "proxy_headers": False,
            "timeout_graceful_shutdown": 20,
            "access_log": False,  # taskapp logs each request itself (observability/http.py)
        }
        if workers > 1:
            try:
                run_workers(uvicorn.Config(APP, **options))
            except OSError as exc:
                sys.exit(f"taskapp: cannot listen on {host}:{port}: {exc.strerror or exc}")
        else:
            uvicorn.run(APP, **options)


def cmd_serve(args: argparse.Namespace) -> None:
    """Production server: configured services only; never trusts the dev key."""
    os.environ.pop("TASKAPP_OIDC_TRUST_DEV_KEY", None)
    settings = load_settings()
    missing = missing_settings(
        TASKAPP_DATABASE_URL=settings.database.url,
        TASKAPP_REDIS_URL=settings.redis.url,
        TASKAPP_OIDC_ISSUER=settings.oidc.issuer,
    )
    if missing:
        sys.exit(f"taskapp serve needs {missing} (or use `taskapp run` for development)")
    serve_app(settings, args.host, args.port, args.workers)
