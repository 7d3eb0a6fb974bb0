"""What a consumer of events is: the kinds it acts on, whom each delivery goes to, and how
a worker delivers one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from prometheus_client import Counter

from taskapp.events.event import NewEvent
from taskapp.events.models import Event


class DeliveryFailed(Exception):
    """A delivery did not go through: retried later, unless `permanent`."""

    def __init__(self, reason: BaseException, *, permanent: bool) -> None:
        super().__init__(f"{type(reason).__name__}: {reason}")
        self.permanent = permanent


class Consumer(ABC):
    """Acts once on each event of `kinds`.

    The API asks `target` when the event is written, and records one delivery with it (none
    to deliver: recorded as skipped); a worker then calls `deliver` until it succeeds, fails
    for good, or runs out of attempts. `deliver` may run again after a crash between its
    effect and the commit of its outcome: make the effect safe to repeat where the receiver
    allows (an e-mail carries a stable Message-ID).
    """

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]]
    # Deliveries by outcome (sent, retried, failed, skipped), under the consumer's own name.
    outcomes: ClassVar[Counter]

    @abstractmethod
    def target(self, event: NewEvent) -> str | None:
        """Whom a delivery of `event` goes to; None when there is nothing to deliver."""

    @abstractmethod
    def deliver(self, event: Event, target: str) -> None:
        """Deliver `event` to `target` (in a worker); raises `DeliveryFailed`."""
