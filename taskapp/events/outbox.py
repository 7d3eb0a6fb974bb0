"""The API side of the outbox: the rows that record a change's events and their deliveries,
written with the change (a unit of work's journal), and their hand-off once committed."""

from __future__ import annotations

from collections.abc import Sequence
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


@lru_cache(maxsize=16)
def _insert(table: Any, columns: tuple[str, ...], rows: int) -> Insert:
    """INSERT of `rows` rows, their values bound as `<table>_<row>_<column>`: built once per
    size and bound per change (building and cache-keying a statement per request is a
    sizeable part of a create's cost), under names apart from those of the statement it
    joins."""
    name, types = table.__tablename__, table.__table__.c
    # Typed: past its first row, a multi-row VALUES does not type a parameter by its column.
    values = [
        {
            column: bindparam(f"{name}_{row}_{column}", type_=types[column].type)
            for column in columns
        }
        for row in range(rows)
    ]
    return insert(table).values(values)


def _bound(table: Any, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    name = table.__tablename__
    return {
        f"{name}_{number}_{column}": value
        for number, row in enumerate(rows)
        for column, value in row.items()
    }


class Outbox:
    """Records events for `consumers`, and hands the committed ones to `relay`.

    An event no consumer takes is not stored. Each consumer that takes one gets a delivery
    row: pending with its target, or skipped when it has nothing to deliver.
    """

    def __init__(self, consumers: Sequence[Consumer], relay: Relay | None) -> None:
        self._consumers = list(consumers)
        self._relay = relay

    def _deliveries(self, event: NewEvent) -> list[tuple[Consumer, str | None]]:
        return [
            (consumer, consumer.target(event))
            for consumer in self._consumers
            if event.kind in consumer.kinds
        ]

    def rows(self, events: Sequence[NewEvent]) -> list[Rider]:
        stored: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        for event in events:
            planned = self._deliveries(event)
            if not planned:
                continue
            stored.append({
                "id": event.id, "kind": event.kind, "aggregate_id": event.aggregate_id,
                "owner": event.owner, "actor": event.actor, "payload": dict(event.payload),
            })  # fmt: skip
            for consumer, target in planned:
                status = DeliveryStatus.PENDING if target is not None else DeliveryStatus.SKIPPED
                deliveries.append({
                    "event_id": event.id, "consumer": consumer.name, "target": target,
                    "status": status.value,
                })  # fmt: skip
        if not stored:
            return []
        return [
            (_insert(Event, _EVENT_COLUMNS, len(stored)), _bound(Event, stored)),
            (_insert(Delivery, _DELIVERY_COLUMNS, len(deliveries)), _bound(Delivery, deliveries)),
        ]

    def committed(self, events: Sequence[NewEvent]) -> None:
        due = []
        for event in events:
            pending = False
            for consumer, target in self._deliveries(event):
                if target is None:
                    consumer.outcomes.labels("skipped").inc()
                else:
                    pending = True
            if pending:
                due.append(event.id)
        if due and self._relay is not None:
            self._relay.publish(due)

    async def aclose(self) -> None:
        if self._relay is not None:
            await self._relay.aclose()
