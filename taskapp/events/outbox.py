"""The API side of the outbox: the rows that record a change's events and their deliveries,
written with the change (a unit of work's journal), and their hand-off once committed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Insert, bindparam, insert

from taskapp.database.unit_of_work import Rider
from taskapp.events.consumer import Consumer
from taskapp.events.event import NewEvent
from taskapp.events.models import Delivery, DeliveryStatus, Event
from taskapp.events.relay import Relay

_EVENT_COLUMNS = ("id", "kind", "aggregate_id", "owner", "actor", "payload")
_DELIVERY_COLUMNS = ("event_id", "consumer", "target", "status")


@lru_cache(maxsize=64)
def _insert(table: Any, columns: tuple[str, ...], row: int) -> Insert:
    """INSERT of one row, its values bound as `<table>_<row>_<column>`: built once and bound
    per change (building and cache-keying a statement per request is a sizeable part of a
    create's cost), under names apart from those of the statement it joins. One row each:
    SQLAlchemy caches no multi-row VALUES, and compiling one per change costs more than
    the change."""
    name = table.__tablename__
    return insert(table).values({column: bindparam(f"{name}_{row}_{column}") for column in columns})


def _rows(table: Any, columns: tuple[str, ...], rows: Sequence[dict[str, Any]]) -> list[Rider]:
    name = table.__tablename__
    return [
        (
            _insert(table, columns, number),
            {f"{name}_{number}_{column}": value for column, value in row.items()},
        )
        for number, row in enumerate(rows)
    ]


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the outbox made of a change's events: their rows, then their hand-off."""

    rows: list[Rider]
    due: list[uuid.UUID]  # events with a delivery to make
    skipped: list[Consumer]  # one per delivery with nothing to deliver
    relay: Relay | None

    def committed(self) -> None:
        for consumer in self.skipped:
            consumer.outcomes.labels("skipped").inc()
        if self.due and self.relay is not None:
            self.relay.publish(self.due)


class Outbox:
    """Records events for `consumers`, and hands the committed ones to `relay`.

    An event no consumer takes is not stored. Each consumer that takes one gets a delivery
    row: pending with its target, or skipped when it has nothing to deliver.
    """

    def __init__(self, consumers: Sequence[Consumer], relay: Relay | None) -> None:
        self._consumers = list(consumers)
        self._relay = relay

    def record(self, events: Sequence[NewEvent]) -> _Entry:
        stored: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        due: list[uuid.UUID] = []
        skipped: list[Consumer] = []
        for event in events:
            takers = [consumer for consumer in self._consumers if event.kind in consumer.kinds]
            if not takers:
                continue
            stored.append({
                "id": event.id, "kind": event.kind, "aggregate_id": event.aggregate_id,
                "owner": event.owner, "actor": event.actor, "payload": dict(event.payload),
            })  # fmt: skip
            pending = False
            for consumer in takers:
                target = consumer.target(event)
                status = DeliveryStatus.PENDING if target is not None else DeliveryStatus.SKIPPED
                deliveries.append({
                    "event_id": event.id, "consumer": consumer.name, "target": target,
                    "status": status.value,
                })  # fmt: skip
                if target is None:
                    skipped.append(consumer)
                else:
                    pending = True
            if pending:
                due.append(event.id)
        rows = _rows(Event, _EVENT_COLUMNS, stored) + _rows(Delivery, _DELIVERY_COLUMNS, deliveries)
        return _Entry(rows, due, skipped, self._relay)

    async def aclose(self) -> None:
        if self._relay is not None:
            await self._relay.aclose()
