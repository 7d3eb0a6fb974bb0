"""The API side of the outbox: a row written with the change, a job after its commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from email.headerregistry import Address
from typing import Any

from celery import Celery
from sqlalchemy import Insert, bindparam, insert

from taskapp.notifications.celery_app import SEND_BATCH_JOB
from taskapp.notifications.models import Notification, NotificationStatus
from taskapp.observability.metrics import NOTIFICATIONS

logger = logging.getLogger(__name__)

# A plain address: nothing that could smuggle a header, a group or a second recipient.
_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")


def usable_address(email: str | None) -> str | None:
    """`email` when it is one plain address the mail library reads back unchanged."""
    if not email or len(email) > 320 or not _ADDRESS.match(email):
        return None
    try:
        parsed = Address(addr_spec=email).addr_spec
    except Exception:  # the stdlib parser raises assorted errors on odd input
        return None
    return email if parsed == email else None


# Built once, bound per notification: building and cache-keying an INSERT per request cost
# a create a tenth of its time. The names keep apart from those of the statement it joins.
_INSERT_TASK_CREATED = insert(Notification).values(
    id=bindparam("notification_id"),
    kind="task_created",
    task_id=bindparam("notification_task_id"),
    owner=bindparam("notification_owner"),
    recipient=bindparam("notification_recipient"),
    payload=bindparam("notification_payload"),
    status=bindparam("notification_status"),
)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A notification to record with the change it reports: `insert`, bound to `parameters`."""

    notification_id: uuid.UUID
    insert: Insert
    parameters: dict[str, Any]
    deliverable: bool


class Outbox:
    """Records notifications and hands them to Celery once they are committed."""

    # After a failed publish, leave the next ones to the sweep for this long: a broker
    # outage under load must not pile up blocked publishing threads.
    PUBLISH_BACKOFF = 5.0
    # The publisher gathers ids for this long after the first one, then sends them all as
    # one job: a message per notification cost a create a third of its time under load.
    LINGER = 0.02
    # Ids per job at most, and most left waiting for the publisher.
    BATCH = 100
    MAX_PENDING = 10_000

    def __init__(self, celery: Celery | None, *, enabled: bool = True) -> None:
        self._celery = celery
        self._enabled = enabled
        self._publish_after = float("-inf")
        self._pending: queue.SimpleQueue[uuid.UUID | None] = queue.SimpleQueue()
        self._publisher: threading.Thread | None = None

    def task_created(
        self, *, task_id: uuid.UUID, owner: str, email: str | None, title: str,
        description: str | None, status: str,
    ) -> OutboxEntry | None:  # fmt: skip
        """The notification of a new task, None when notifications are off. Its row must be
        inserted by the statement that inserts the task: the e-mail exists exactly when the
        task does. Once that has committed, hand the entry to `committed`."""
        if not self._enabled:
            return None
        recipient = usable_address(email)
        notification_id = uuid.uuid4()
        parameters = {
            "notification_id": notification_id,
            "notification_task_id": task_id,
            "notification_owner": owner,
            "notification_recipient": recipient,
            "notification_payload": {"title": title, "description": description, "status": status},
            # No usable address: recorded, never sent.
            "notification_status": (
                NotificationStatus.PENDING if recipient else NotificationStatus.SKIPPED
            ).value,
        }
        return OutboxEntry(
            notification_id, _INSERT_TASK_CREATED, parameters, deliverable=recipient is not None
        )

    def committed(self, entry: OutboxEntry) -> None:
        """`entry`'s row is committed: its job goes to Celery (never awaited, never failing)."""
        if entry.deliverable:
            self._start_enqueue(entry.notification_id)
        else:
            NOTIFICATIONS.labels("skipped").inc()

    def _start_enqueue(self, notification_id: uuid.UUID) -> None:
        # Publishing is blocking I/O and the broker may be down: never on the event loop,
        # never awaited by the request. A job that is not published is found by the sweep.
        if self._celery is None or time.monotonic() < self._publish_after:
            return
        if self._pending.qsize() >= self.MAX_PENDING:
            return  # the publisher is stuck (a hung broker): the sweep has these rows
        if self._publisher is None:
            self._publisher = threading.Thread(
                target=self._publish_forever, name="taskapp-outbox-publisher", daemon=True
            )
            self._publisher.start()
        self._pending.put(notification_id)

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

    def _publish(self, notification_ids: list[uuid.UUID]) -> None:
        assert self._celery is not None
        if not notification_ids or time.monotonic() < self._publish_after:
            return
        try:
            self._celery.send_task(
                SEND_BATCH_JOB, args=[[str(i) for i in notification_ids]], retry=False
            )
        except Exception as exc:  # broker unreachable: the sweep re-enqueues the rows later
            self._publish_after = time.monotonic() + self.PUBLISH_BACKOFF
            logger.warning(
                "could not enqueue notifications (%d waiting): %r", len(notification_ids), exc
            )

    async def aclose(self) -> None:
        """Wait (briefly) for publishes under way, so a shutdown does not cut them off."""
        if self._publisher is not None:
            self._pending.put(None)
            await asyncio.to_thread(self._publisher.join, 5)
