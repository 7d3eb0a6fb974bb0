"""What a Prometheus scrape reads, and the static token that may read it.

Shared by the API's /metrics (exposition.py) and the listener of the Celery worker and beat
(metrics_server.py).
"""

from __future__ import annotations

import contextlib
import hmac
import os
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import SecretStr

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def forget_dead_processes(directory: str) -> None:
    """Drop the live-gauge files of processes that died without saying so (uvicorn restarts
    a crashed worker, a Celery pool process is killed), so `live*` gauges count living ones."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            # Concurrent scrapes in other processes may remove the same file first.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except PermissionError:
            pass


def process_registry() -> CollectorRegistry:
    """The process, GC and platform metrics of the process answering the scrape."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def scrape_registry() -> CollectorRegistry:
    """Everything this process and its siblings recorded: with PROMETHEUS_MULTIPROC_DIR,
    the totals of every process writing there, plus this process's own process metrics."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return REGISTRY
    forget_dead_processes(directory)
    registry = process_registry()
    MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    return registry


def is_scrape_token(authorization: str, token: SecretStr | None) -> bool:
    """Whether an Authorization header carries the static TASKAPP_METRICS_TOKEN."""
    if token is None:
        return False
    scheme, _, credentials = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        credentials.strip().encode(), token.get_secret_value().encode()
    )
