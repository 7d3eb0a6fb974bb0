"""Which consumers this deployment runs: the same list in the API (to record deliveries) and
in the workers (to make them)."""

from __future__ import annotations

from taskapp.config import Settings
from taskapp.events.consumer import Consumer
from taskapp.events.consumers.email import EmailConsumer


def consumers(settings: Settings) -> list[Consumer]:
    """The enabled consumers; an event no consumer takes is not stored."""
    found: list[Consumer] = []
    if settings.notifications.enabled:
        found.append(EmailConsumer(settings.smtp, link_base=settings.notifications.link_base))
    return found
