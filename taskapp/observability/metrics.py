"""Prometheus metrics of the service. Names are stable: dashboards and alerts use them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
    "Notifications waiting to be sent, as counted by the last outbox sweep",
)
