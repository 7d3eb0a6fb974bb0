"""Celery jobs: send notifications (exactly once per row), and sweep the outbox.

Run by `taskapp worker` (worker with beat) or `taskapp beat`. Workers use a synchronous
PostgreSQL driver: Celery jobs are synchronous code.
"""

from __future__ import annotations

import logging
import os
import random
import smtplib
import uuid
from datetime import timedelta
from functools import cache
from typing import Any

from celery import Task
from celery.signals import worker_process_init, worker_process_shutdown
from prometheus_client import multiprocess
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from taskapp.config import get_settings
from taskapp.db import create_sync_engine
from taskapp.notifications import mail
from taskapp.notifications.celery_app import SEND_BATCH_JOB, SEND_JOB, SWEEP_JOB, create_celery
from taskapp.notifications.models import Notification, NotificationStatus
from taskapp.observability.metrics import NOTIFICATIONS, OUTBOX_PENDING
from taskapp.observability.scrape import MULTIPROCESS_ENV

logger = logging.getLogger(__name__)

settings = get_settings()
celery = create_celery(settings)

SWEEP_BATCH = 500
PENDING = NotificationStatus.PENDING.value


@cache
def _sessions() -> sessionmaker[Session]:
    engine = create_sync_engine(settings.database, pool_size=2, max_overflow=2)
    return sessionmaker(engine, expire_on_commit=False)


@worker_process_init.connect
def _forget_inherited_pool(**_: Any) -> None:
    # A forked pool process must not share its parent's connections.
    _sessions.cache_clear()


@worker_process_shutdown.connect
def _forget_exited_process(pid: int, **_: Any) -> None:
    # Sent in the pool process as it exits: its live gauges (the outbox backlog it last
    # measured) leave the totals with it; its counters stay, as counters must.
    directory = os.environ.get(MULTIPROCESS_ENV)
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about backoff * 2**(attempt-1), capped."""
    config = settings.notifications
    ceiling = min(config.backoff_max, config.backoff * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy  # nosec B311


def deliver(notification_id: uuid.UUID) -> tuple[str, float]:
    """Send the notification if it is still pending and due; (outcome, retry delay).

    The row is claimed with a row lock (SKIP LOCKED, so a concurrent duplicate job moves
    on) and marked sent in the same transaction, so a row already sent is never sent again.
    """
    with _sessions()() as session, session.begin():
        row = session.scalars(
            select(Notification)
            .where(
                Notification.id == notification_id,
                Notification.status == PENDING,
                Notification.next_attempt_at <= func.now(),
            )
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if row is None:
            return "nothing to do", 0.0  # sent, failed, skipped, not due, or being sent
        outcome, delay = _attempt(row)
    # Counted once the outcome is committed.
    NOTIFICATIONS.labels(outcome).inc()
    return outcome, delay


def _attempt(row: Notification) -> tuple[str, float]:
    """One delivery attempt; records its result on the (locked) row."""
    row.attempts += 1
    try:
        message = mail.render(row, settings.smtp.from_address)
    except Exception as exc:  # a message that cannot be built never will be
        return _give_up(row, exc)
    try:
        mail.send(message, settings.smtp)
    except (smtplib.SMTPException, OSError) as exc:
        if mail.is_permanent(exc) or row.attempts >= settings.notifications.max_attempts:
            return _give_up(row, exc)
        row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        delay = _backoff(row.attempts)
        row.next_attempt_at = func.now() + timedelta(seconds=delay)
        logger.warning(
            "notification %s: attempt %d failed (%s); retrying in %.0fs",
            row.id,
            row.attempts,
            row.last_error,
            delay,
        )
        return "retried", delay
    row.status = NotificationStatus.SENT.value
    row.sent_at = func.now()
    return "sent", 0.0


def _give_up(row: Notification, exc: BaseException) -> tuple[str, float]:
    row.status = NotificationStatus.FAILED.value
    row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
    logger.error(
        "notification %s failed after %d attempts: %s", row.id, row.attempts, row.last_error
    )
    return "failed", 0.0


@celery.task(bind=True, name=SEND_JOB, max_retries=None)
def send_notification(self: Task[Any, Any], notification_id: str) -> str:
    outcome, delay = deliver(uuid.UUID(notification_id))
    if outcome == "retried":
        # After the commit above: the row already says when it is due again.
        raise self.retry(countdown=delay + 0.5)
    return outcome


@celery.task(name=SEND_BATCH_JOB)
def send_notifications(notification_ids: list[str]) -> dict[str, int]:
    """Send several notifications one after the other, each exactly as `send_notification`
    would; one to be retried goes on as a job of its own, with its countdown.

    An error (the database or the broker gone) ends the job: the rows not done yet stay
    pending, and the sweep enqueues them again once they are past their grace period.
    """
    outcomes: dict[str, int] = {}
    for done, notification_id in enumerate(notification_ids):
        try:
            outcome, delay = deliver(uuid.UUID(notification_id))
            if outcome == "retried":
                send_notification.apply_async(args=(notification_id,), countdown=delay + 0.5)
        except Exception:
            logger.error(
                "stopped after %d of %d notifications; the sweep will enqueue the rest",
                done,
                len(notification_ids),
            )
            raise
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


@celery.task(name=SWEEP_JOB)
def sweep_outbox() -> int:
    """Re-enqueue notifications still pending a grace period after they were due (their
    job was never published, or was lost with a worker); report the backlog."""
    grace = timedelta(seconds=settings.notifications.grace)
    with _sessions()() as session:
        OUTBOX_PENDING.set(
            session.scalar(
                select(func.count()).select_from(Notification).where(Notification.status == PENDING)
            )
            or 0
        )
        due = session.scalars(
            select(Notification.id)
            .where(
                Notification.status == PENDING, Notification.next_attempt_at <= func.now() - grace
            )
            .order_by(Notification.next_attempt_at)
            .limit(SWEEP_BATCH)
        ).all()
    for notification_id in due:
        send_notification.apply_async(args=(str(notification_id),))
    if due:
        logger.info("outbox sweep re-enqueued %d notifications", len(due))
    return len(due)
