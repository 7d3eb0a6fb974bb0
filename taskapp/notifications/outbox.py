"""The API side of the outbox: a row in the request's transaction, a job after its commit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from email.headerregistry import Address

from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession

from taskapp.db import after_commit
from taskapp.notifications.models import Notification, NotificationStatus
from taskapp.observability.metrics import NOTIFICATIONS

logger = logging.getLogger(__name__)

SEND_JOB = "taskapp.send_notification"
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


class Outbox:
    """Records notifications and hands them to Celery once they are committed."""

    # After a failed publish, leave the next ones to the sweep for this long: a broker
    # outage under load must not pile up blocked publishing threads.
    PUBLISH_BACKOFF = 5.0

    def __init__(self, celery: Celery | None, *, enabled: bool = True) -> None:
        self._celery = celery
        self._enabled = enabled
        self._publish_after = float("-inf")
        self._enqueues: set[asyncio.Task[None]] = set()

    async def task_created(
        self, session: AsyncSession, *, task_id: uuid.UUID, owner: str, email: str | None,
        title: str, description: str | None, status: str,
    ) -> Notification | None:  # fmt: skip
        if not self._enabled:
            return None
        recipient = usable_address(email)
        notification = Notification(
            id=uuid.uuid4(),
            kind="task_created",
            task_id=task_id,
            owner=owner,
            recipient=recipient,
            payload={"title": title, "description": description, "status": status},
            # No usable address: recorded, never sent.
            status=(NotificationStatus.PENDING if recipient else NotificationStatus.SKIPPED).value,
        )
        session.add(notification)

        async def committed() -> None:
            if recipient is None:
                NOTIFICATIONS.labels("skipped").inc()
            else:
                self._start_enqueue(notification.id)

        after_commit(session, committed)
        return notification

    def _start_enqueue(self, notification_id: uuid.UUID) -> None:
        # Publishing is blocking I/O and the broker may be down: never on the event loop,
        # never awaited by the request. A job that is not published is found by the sweep.
        if self._celery is None or time.monotonic() < self._publish_after:
            return
        task = asyncio.create_task(asyncio.to_thread(self._publish, notification_id))
        self._enqueues.add(task)
        task.add_done_callback(self._enqueues.discard)

    def _publish(self, notification_id: uuid.UUID) -> None:
        assert self._celery is not None
        try:
            self._celery.send_task(SEND_JOB, args=[str(notification_id)], retry=False)
        except Exception as exc:  # broker unreachable: the sweep re-enqueues the row later
            self._publish_after = time.monotonic() + self.PUBLISH_BACKOFF
            logger.warning("could not enqueue notification %s: %r", notification_id, exc)

    async def aclose(self) -> None:
        """Wait (briefly) for publishes under way, so a shutdown does not cut them off."""
        if self._enqueues:
            await asyncio.wait(self._enqueues, timeout=5)
