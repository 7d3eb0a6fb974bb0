"""The worker side of the outbox: Celery jobs that deliver each event to its consumers
exactly once, and the sweep that finds what was never handed on.

Built by `create_worker(settings)` and run by `taskapp worker` (with beat inside) or
`taskapp beat`. The jobs are synchronous code, on a synchronous PostgreSQL driver.
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init, worker_process_shutdown
from prometheus_client import multiprocess
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from taskapp.config import Settings
from taskapp.database.engine import create_sync_engine
from taskapp.events.celery_app import DELIVER_EVENTS_JOB, DELIVER_JOB, SWEEP_JOB, create_celery
from taskapp.events.consumer import Consumer, DeliveryFailed
from taskapp.events.models import Delivery, DeliveryStatus, Event
from taskapp.events.registry import consumers
from taskapp.observability.metrics import OUTBOX_PENDING
from taskapp.observability.scrape import MULTIPROCESS_ENV

logger = logging.getLogger(__name__)

SWEEP_BATCH = 500
PENDING = DeliveryStatus.PENDING.value


@dataclass
class Deliverer:
    """What the jobs of one worker process share: settings, consumers, database sessions."""

    settings: Settings

    @cached_property
    def consumers(self) -> dict[str, Consumer]:
        return {consumer.name: consumer for consumer in consumers(self.settings)}

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        engine = create_sync_engine(self.settings.database, pool_size=2, max_overflow=2)
        return sessionmaker(engine, expire_on_commit=False)

    def forget_connections(self) -> None:
        """In a forked pool process: its parent's connections are not its own."""
        self.__dict__.pop("sessions", None)

    def backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: about backoff * 2**(attempt-1), capped."""
        config = self.settings.notifications
        ceiling = min(config.backoff_max, config.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not secrecy  # nosec B311

    def deliver(self, event_id: uuid.UUID, consumer: str) -> tuple[str, float]:
        """Make the delivery if it is still pending and due; (outcome, retry delay).

        The delivery row is claimed with a row lock (SKIP LOCKED, so a concurrent duplicate
        job moves on) and its outcome committed in the same transaction, so a delivery that
        went through is never made again.
        """
        with self.sessions() as session, session.begin():
            found = session.execute(
                select(Delivery, Event)
                .join(Event, Event.id == Delivery.event_id)
                .where(
                    Delivery.event_id == event_id,
                    Delivery.consumer == consumer,
                    Delivery.status == PENDING,
                    Delivery.next_attempt_at <= func.now(),
                )
                .with_for_update(of=Delivery, skip_locked=True)
            ).one_or_none()
            if found is None:
                return "nothing to do", 0.0  # made, given up, skipped, not due, or under way
            delivery, event = found
            handler = self.consumers.get(consumer)
            if handler is None:
                # A job for a consumer this worker does not run: leave it to one that does.
                return "nothing to do", 0.0
            outcome, delay = self._attempt(handler, delivery, event)
        # Counted once the outcome is committed.
        handler.outcomes.labels(outcome).inc()
        return outcome, delay

    def _attempt(self, consumer: Consumer, delivery: Delivery, event: Event) -> tuple[str, float]:
        """One attempt; records its result on the (locked) delivery row."""
        delivery.attempts += 1
        assert delivery.target is not None  # a pending delivery has one
        try:
            consumer.deliver(event, delivery.target)
        except DeliveryFailed as failure:
            error = str(failure)[:2000]
            if failure.permanent or delivery.attempts >= self.settings.notifications.max_attempts:
                delivery.status = DeliveryStatus.FAILED.value
                delivery.last_error = error
                logger.error(
                    "%s delivery of event %s failed after %d attempts: %s",
                    consumer.name, event.id, delivery.attempts, error,
                )  # fmt: skip
                return "failed", 0.0
            delivery.last_error = error
            delay = self.backoff(delivery.attempts)
            delivery.next_attempt_at = func.now() + timedelta(seconds=delay)
            logger.warning(
                "%s delivery of event %s: attempt %d failed (%s); retrying in %.0fs",
                consumer.name, event.id, delivery.attempts, error, delay,
            )  # fmt: skip
            return "retried", delay
        delivery.status = DeliveryStatus.SENT.value
        delivery.finished_at = func.now()
        return "sent", 0.0

    def pending(self, event_ids: list[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
        """The pending deliveries of `event_ids` that this worker's consumers make."""
        with self.sessions() as session:
            rows = session.execute(
                select(Delivery.event_id, Delivery.consumer).where(
                    Delivery.event_id.in_(event_ids),
                    Delivery.status == PENDING,
                    Delivery.consumer.in_(self.consumers),
                )
            ).all()
        return [(event_id, consumer) for event_id, consumer in rows]

    def overdue(self) -> list[tuple[uuid.UUID, str]]:
        """Deliveries still pending a grace period after they were due (their job was never
        published, or was lost with a worker), of this worker's consumers; reports the
        backlog of all of them as it goes."""
        grace = timedelta(seconds=self.settings.notifications.grace)
        with self.sessions() as session:
            backlog = session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.status == PENDING)
            )
            OUTBOX_PENDING.set(backlog or 0)
            rows = session.execute(
                select(Delivery.event_id, Delivery.consumer)
                .where(
                    Delivery.status == PENDING,
                    Delivery.consumer.in_(self.consumers),
                    Delivery.next_attempt_at <= func.now() - grace,
                )
                .order_by(Delivery.next_attempt_at)
                .limit(SWEEP_BATCH)
            ).all()
        return [(event_id, consumer) for event_id, consumer in rows]


def create_worker(settings: Settings) -> Celery:
    """The Celery application of `taskapp worker` and `taskapp beat`, with its jobs."""
    celery = create_celery(settings)
    deliverer = Deliverer(settings)

    @celery.task(bind=True, name=DELIVER_JOB, max_retries=None)
    def deliver(self: Task[Any, Any], event_id: str, consumer: str) -> str:
        outcome, delay = deliverer.deliver(uuid.UUID(event_id), consumer)
        if outcome == "retried":
            # After the commit above: the row already says when it is due again.
            raise self.retry(countdown=delay + 0.5)
        return outcome

    @celery.task(name=DELIVER_EVENTS_JOB)
    def deliver_events(event_ids: list[str]) -> dict[str, int]:
        """Every pending delivery of `event_ids`, one after the other, each exactly as
        `deliver` would make it; one to be retried goes on as a job of its own.

        An error (the database or the broker gone) ends the job: the deliveries not made
        yet stay pending, and the sweep enqueues them again after their grace period.
        """
        outcomes: dict[str, int] = {}
        due = deliverer.pending([uuid.UUID(event_id) for event_id in event_ids])
        for done, (event_id, consumer) in enumerate(due):
            try:
                outcome, delay = deliverer.deliver(event_id, consumer)
                if outcome == "retried":
                    deliver.apply_async(args=(str(event_id), consumer), countdown=delay + 0.5)
            except Exception:
                logger.error(
                    "stopped after %d of %d deliveries; the sweep will enqueue the rest",
                    done,
                    len(due),
                )
                raise
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        return outcomes

    @celery.task(name=SWEEP_JOB)
    def sweep_outbox() -> int:
        """Re-enqueue the overdue deliveries; report the backlog."""
        overdue = deliverer.overdue()
        for event_id, consumer in overdue:
            deliver.apply_async(args=(str(event_id), consumer))
        if overdue:
            logger.info("outbox sweep re-enqueued %d deliveries", len(overdue))
        return len(overdue)

    def forget_inherited_pool(**_: Any) -> None:
        deliverer.forget_connections()

    def forget_exited_process(pid: int, **_: Any) -> None:
        # Sent in the pool process as it exits: its live gauges (the outbox backlog it last
        # measured) leave the totals with it; its counters stay, as counters must.
        directory = os.environ.get(MULTIPROCESS_ENV)
        if directory:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]

    worker_process_init.connect(forget_inherited_pool, weak=False)
    worker_process_shutdown.connect(forget_exited_process, weak=False)
    return celery
