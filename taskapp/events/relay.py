"""The relay: hands committed events to the Celery broker, from a thread of its own, in
batches; what it cannot hand on is found later by the sweep (taskapp.events.worker)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid

from celery import Celery

from taskapp.events.celery_app import DELIVER_EVENTS_JOB

logger = logging.getLogger(__name__)


class Relay:
    """Publishes the ids of committed events as `DELIVER_EVENTS_JOB` jobs."""

    # After a failed publish, leave the next ones to the sweep for this long: a broker
    # outage under load must not pile up blocked publishing threads.
    PUBLISH_BACKOFF = 5.0
    # The publisher gathers ids for this long after the first one, then sends them all as
    # one job: publishing through Celery holds the interpreter lock for most of a
    # millisecond, so the fewer jobs the less a create waits for it. A mail leaves at most
    # this much later.
    LINGER = 0.1
    # Ids per job at most, and most left waiting for the publisher.
    BATCH = 100
    MAX_PENDING = 10_000

    def __init__(self, celery: Celery) -> None:
        self._celery = celery
        self._publish_after = float("-inf")
        self._pending: queue.SimpleQueue[uuid.UUID | None] = queue.SimpleQueue()
        self._publisher: threading.Thread | None = None

    def publish(self, event_ids: list[uuid.UUID]) -> None:
        """Hand `event_ids` on: never awaited, never failing, never blocking the event loop.

        Publishing is blocking I/O and the broker may be down: it happens in the publisher
        thread. An event that is not published is found by the sweep."""
        if time.monotonic() < self._publish_after:
            return
        if self._pending.qsize() >= self.MAX_PENDING:
            return  # the publisher is stuck (a hung broker): the sweep has these rows
        if self._publisher is None:
            self._publisher = threading.Thread(
                target=self._publish_forever, name="taskapp-outbox-relay", daemon=True
            )
            self._publisher.start()
        for event_id in event_ids:
            self._pending.put(event_id)

    def _publish_forever(self) -> None:
        """One thread per process publishes everything: after the first id it waits
        `LINGER` for more, then sends what has gathered as jobs of up to `BATCH` ids.

        The sleep makes it one wake-up and one broker round trip per batch, instead of a
        GIL hand-off and a message per create."""
        while True:
            batch = [self._pending.get()]
            if batch[0] is not None:
                time.sleep(self.LINGER)
            with contextlib.suppress(queue.Empty):
                while len(batch) < self.MAX_PENDING:
                    batch.append(self._pending.get_nowait())
            ids = [item for item in batch if item is not None]
            for start in range(0, len(ids), self.BATCH):
                self._publish(ids[start : start + self.BATCH])
            if None in batch:
                return

    def _publish(self, event_ids: list[uuid.UUID]) -> None:
        if not event_ids or time.monotonic() < self._publish_after:
            return
        try:
            self._celery.send_task(
                DELIVER_EVENTS_JOB, args=[[str(i) for i in event_ids]], retry=False
            )
        except Exception as exc:  # broker unreachable: the sweep re-enqueues the rows later
            self._publish_after = time.monotonic() + self.PUBLISH_BACKOFF
            logger.warning("could not enqueue events (%d waiting): %r", len(event_ids), exc)

    async def aclose(self) -> None:
        """Wait (briefly) for publishes under way, so a shutdown does not cut them off."""
        if self._publisher is not None:
            self._pending.put(None)
            await asyncio.to_thread(self._publisher.join, 5)
