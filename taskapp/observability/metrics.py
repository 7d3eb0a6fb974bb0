"""Prometheus metrics of the service. Names are stable: dashboards and alerts use them.

With several worker processes (`taskapp serve --workers N`) every process writes its values
to `PROMETHEUS_MULTIPROC_DIR` and a scrape reports the totals; gauges declare how their
per-process values combine.
"""

from __future__ import annotations

from functools import cache
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

M = TypeVar("M", Counter, Histogram)


class Labelled(Generic[M]):
    """`metric.labels(*values)`, remembered per combination of values: on a request's path,
    finding the labelled child cost more than counting in it. Values are strings."""

    __slots__ = ("_children", "_metric")
    _metric: M
    _children: dict[tuple[str, ...], M]

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


# -- database ---------------------------------------------------------------------------------
@cache
def db_up() -> Gauge:
    """Created by the first probe, so processes that never probe (Celery workers sharing the
    metrics directory in `taskapp run`) report nothing instead of a 0 that wins the min."""
    return Gauge(
        "db_up",
        "1 when the database answers a probe, 0 when it does not",
        multiprocess_mode="livemin",  # down for any API worker is down
    )


DB_QUERY_LATENCY = Histogram(
    "db_query_latency_seconds",
    "Time of each database statement, by kind of operation",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DB_ERRORS = Counter("db_errors", "Failed database operations, by error class", ["error"])
DB_POOL_SIZE = Gauge("db_pool_size", "Connections the pools keep", multiprocess_mode="livesum")
DB_POOL_CHECKED_OUT = Gauge(
    "db_pool_checked_out", "Connections in use", multiprocess_mode="livesum"
)
DB_POOL_OVERFLOW = Gauge(
    "db_pool_overflow", "Connections beyond the pool size", multiprocess_mode="livesum"
)

DB_READS = Counter(
    "db_reads",
    "Reads loaded from the database while a read replica is configured, by the server that"
    " answered them (replica, primary)",
    ["server"],
)


@cache
def db_replica_up() -> Gauge:
    return Gauge(
        "db_replica_up",
        "1 while the read replica serves reads, 0 while it is down or not a standby",
        multiprocess_mode="livemin",
    )


@cache
def db_replica_lag() -> Gauge:
    return Gauge(
        "db_replica_lag_seconds",
        "Seconds since the newest moment the read replica is known to have replayed",
        multiprocess_mode="livemax",
    )


# -- HTTP ------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# -- identity provider ---------------------------------------------------------------------------
JWKS_FETCHES = Counter(
    "taskapp_jwks_fetches",
    "Fetches of the identity provider's keys by outcome: ok, failed (the keys known are "
    "kept), unusable (a key set without one usable signing key; the keys known are kept)",
    ["outcome"],
)

# -- cache, rate limit, notifications ------------------------------------------------------------
CACHE_REQUESTS = Counter(
    "taskapp_cache_requests",
    "Response cache lookups by result: hit, miss, or bypass (Redis unavailable)",
    ["result"],
)
CACHE_ERRORS = Counter(
    "taskapp_cache_errors",
    "Redis failures of the response cache, by operation",
    ["operation"],
)
RATE_LIMIT_DECISIONS = Counter(
    "taskapp_rate_limit_decisions",
    "Rate limit decisions by caller kind (user, anonymous) and decision (allowed, limited)",
    ["kind", "decision"],
)
RATE_LIMIT_ERRORS = Counter(
    "taskapp_rate_limit_errors",
    "Redis failures of the rate limiter; requests then pass (fail open) or get 503",
)
NOTIFICATIONS = Counter(
    "taskapp_notifications",
    "Notification e-mails by outcome: sent, failed (gave up), retried, skipped (no address)",
    ["outcome"],
)
OUTBOX_PENDING = Gauge(
    "taskapp_outbox_pending",
    "Deliveries of events waiting to be made (the e-mails), as counted by the last sweep",
    multiprocess_mode="livemax",
)
