"""The unit of work: statements and events commit together or not at all; cache views are
forgotten, and events handed on, only after the commit; a single statement carries its
events inside it and needs no transaction; an outcome lost in transit forgets what the
change may have touched."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy import Table, insert, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from taskapp.config import DatabaseSettings, SMTPSettings
from taskapp.database.engine import create_engine
from taskapp.database.outages import DatabaseUnavailableError, OutcomeUnknownError
from taskapp.database.servers import DatabaseServer
from taskapp.database.unit_of_work import Rider, UnitOfWork
from taskapp.events.consumers.email import TASK_CREATED, EmailConsumer
from taskapp.events.event import NewEvent
from taskapp.events.outbox import Outbox
from taskapp.membership.models import inbox_id
from taskapp.tasks.models import Task
from tests.conftest import SettingsFactory

TASKS = cast(Table, Task.__table__)


@dataclass
class Witnessed:
    """The witness's record of a unit of work's events."""

    witness: Witness
    rows: Sequence[Rider]
    ids: list[uuid.UUID]

    def committed(self) -> None:
        self.witness.calls.append(("committed", self.ids, self.witness.visible))


@dataclass
class Witness:
    """Journal and invalidator both: records what it is told, and whether the change was
    committed (visible to another connection) when it was told."""

    engine: AsyncEngine
    outbox: Outbox
    owner: str
    calls: list[tuple[str, Any, bool]] = field(default_factory=list)
    visible: bool = False

    def record(self, events: Sequence[NewEvent]) -> Witnessed:
        return Witnessed(self, self.outbox.record(events).rows, [e.id for e in events])

    async def invalidate(self, *views: str) -> None:
        self.visible = await self._visible()
        self.calls.append(("invalidate", views, self.visible))

    async def invalidate_all(self) -> None:
        self.calls.append(("invalidate_all", (), await self._visible()))

    async def _visible(self) -> bool:
        async with self.engine.connect() as connection:
            count = await connection.scalar(
                text("SELECT count(*) FROM tasks WHERE owner = :owner"), {"owner": self.owner}
            )
        return bool(count)


@pytest.fixture
def database(make_settings: SettingsFactory) -> DatabaseSettings:
    return make_settings().database


@pytest.fixture
async def engine(database: DatabaseSettings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database)
    yield engine
    await engine.dispose()


@pytest.fixture
async def server(database: DatabaseSettings) -> AsyncIterator[DatabaseServer]:
    server = await DatabaseServer.open(database)
    yield server
    await server.aclose()


@pytest.fixture
def owner() -> str:
    return f"uow-{uuid.uuid4()}"


@pytest.fixture
async def witness(engine: AsyncEngine, owner: str) -> AsyncIterator[Witness]:
    outbox = Outbox([EmailConsumer(SMTPSettings(_env_file=None))], relay=None)
    yield Witness(engine, outbox, owner)
    async with engine.begin() as connection:
        await connection.execute(text("DELETE FROM tasks WHERE owner = :o"), {"o": owner})
        await connection.execute(text("DELETE FROM events WHERE owner = :o"), {"o": owner})


def _work(
    server: DatabaseServer,
    witness: Witness,
    *,
    single_statement: bool = False,
    gate: Any = None,
) -> UnitOfWork[NewEvent]:
    return UnitOfWork(
        server,
        gate=gate,
        journal=witness,
        invalidator=witness,
        single_statement=single_statement,
    )


def _task(owner: str, title: str) -> tuple[Any, dict[str, Any]]:
    values = {"project_id": inbox_id(owner), "created_by": owner}
    return insert(TASKS).values(id=uuid.uuid4(), owner=owner, title=title, **values), {}


def _created(owner: str) -> NewEvent:
    payload = {"title": "t", "description": None, "status": "pending", "email": "a@example.com"}
    return NewEvent(TASK_CREATED, uuid.uuid4(), owner, owner, payload)


async def _count(engine: AsyncEngine, table: str, owner: str) -> int:
    async with engine.connect() as connection:
        query = text(f"SELECT count(*) FROM {table} WHERE owner = :owner")
        return int(await connection.scalar(query, {"owner": owner}) or 0)


async def test_several_statements_and_their_events_commit_together(engine, server, witness, owner):
    created = _created(owner)
    async with _work(server, witness) as work:
        work.emit(created)
        for title in ("one", "two"):
            await work.fetch(*_task(owner, title))
        work.touches(f"owner:{owner}")
        # Inside the transaction: nothing is visible to anyone else yet.
        assert await _count(engine, "tasks", owner) == 0
        assert await _count(engine, "events", owner) == 0
    assert await _count(engine, "tasks", owner) == 2
    assert await _count(engine, "events", owner) == 1
    # The view was forgotten, and the event handed on, once the change was committed.
    assert witness.calls == [
        ("invalidate", (f"owner:{owner}",), True),
        ("committed", [created.id], True),
    ]


async def test_a_failure_inside_rolls_back_everything_and_has_no_effects(
    engine, server, witness, owner
):
    async def failing() -> None:
        async with _work(server, witness) as work:
            work.emit(_created(owner))
            await work.fetch(*_task(owner, "one"))
            work.touches(f"owner:{owner}")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await failing()
    assert await _count(engine, "tasks", owner) == 0
    assert await _count(engine, "events", owner) == 0
    assert witness.calls == []


async def test_a_single_statement_carries_its_events_outside_a_transaction(
    engine, server, witness, owner
):
    sent: list[tuple[str, bool]] = []

    def record(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        sent.append((statement, in_transaction))

    created = _created(owner)
    with server.observing(record):
        async with _work(server, witness, single_statement=True) as work:
            work.emit(created)
            statement, _ = _task(owner, "one")
            await work.fetch(statement.returning(TASKS.c.id))
            work.touches(f"owner:{owner}")
    [(statement, in_transaction)] = sent
    assert "INSERT INTO events" in statement
    assert "INSERT INTO deliveries" in statement
    assert "INSERT INTO tasks" in statement
    assert not in_transaction
    assert await _count(engine, "tasks", owner) == 1
    assert await _count(engine, "events", owner) == 1
    assert witness.calls == [
        ("invalidate", (f"owner:{owner}",), True),
        ("committed", [created.id], True),
    ]


async def test_a_single_statement_refuses_a_second_one_and_a_late_event(
    engine, server, witness, owner
):
    async def two_statements() -> None:
        async with _work(server, witness, single_statement=True) as work:
            await work.fetch(*_task(owner, "one"))
            await work.fetch(*_task(owner, "two"))

    async def a_late_event() -> None:
        async with _work(server, witness, single_statement=True) as work:
            await work.fetch(*_task(owner, "three"))
            work.emit(_created(owner))

    with pytest.raises(RuntimeError, match="second statement"):
        await two_statements()
    with pytest.raises(RuntimeError, match="events before it"):
        await a_late_event()
    # Each first statement had committed as it returned; the refused ones never ran.
    assert await _count(engine, "tasks", owner) == 2


async def test_events_alone_are_the_change(engine, server, witness, owner):
    async with _work(server, witness, single_statement=True) as work:
        work.emit(_created(owner))
        work.emit(_created(owner))
    assert await _count(engine, "events", owner) == 2
    [(kind, ids, _)] = witness.calls
    assert kind == "committed"
    assert len(ids) == 2


async def test_a_lost_answer_forgets_what_the_change_may_have_touched(
    make_settings: SettingsFactory, witness, owner
):
    database = make_settings(database={"command_timeout": 0.3}).database
    server = await DatabaseServer.open(database)

    async def lose(*views: str, single_statement: bool = True) -> None:
        async with _work(server, witness, single_statement=single_statement) as work:
            work.may_touch(*views)
            await work.fetch(text("SELECT pg_sleep(2)"))

    try:
        with pytest.raises(OutcomeUnknownError):
            await lose(f"owner:{owner}", "admin")
        # An admin's change, whose owner only its statement would have told: everything.
        with pytest.raises(OutcomeUnknownError):
            await lose()
        # Inside a transaction the same loss rolled the change back: nothing to forget.
        with pytest.raises(DatabaseUnavailableError) as raised:
            await lose(f"owner:{owner}", single_statement=False)
        assert not isinstance(raised.value, OutcomeUnknownError)
    finally:
        await server.aclose()
    assert [(kind, views) for kind, views, _ in witness.calls] == [
        ("invalidate", (f"owner:{owner}", "admin")),
        ("invalidate_all", ()),
    ]


async def test_nothing_changed_forgets_nothing(engine, server, witness, owner):
    async with _work(server, witness, single_statement=True) as work:
        work.may_touch(f"owner:{owner}")
        result = await work.fetch(
            update(TASKS).where(TASKS.c.owner == owner).values(title="x").returning(TASKS.c.id)
        )
        assert result == []
    assert witness.calls == []


async def test_the_gate_is_passed_before_the_first_statement_or_refuses_it(
    engine, server, witness, owner
):
    passed: list[str] = []

    async def gate() -> None:
        passed.append("gate")

    async with _work(server, witness, gate=gate) as work:
        await work.fetch(*_task(owner, "one"))
        await work.fetch(*_task(owner, "two"))
    assert passed == ["gate"]

    class Refused(Exception):
        pass

    async def refusing() -> None:
        raise Refused

    async def refused() -> None:
        async with _work(server, witness, gate=refusing) as work:
            await work.fetch(*_task(owner, "three"))

    with pytest.raises(Refused):
        await refused()
    assert await _count(engine, "tasks", owner) == 2


async def test_a_connection_back_from_a_transaction_commits_each_statement_again(
    make_settings: SettingsFactory, engine, witness, owner
):
    database = make_settings(database={"pool_size": 1, "max_overflow": 0}).database
    server = await DatabaseServer.open(database)
    inside: list[bool] = []

    def record(statement: str, arguments: Sequence[Any], in_transaction: bool) -> None:
        inside.append(in_transaction)

    try:
        with server.observing(record):
            async with _work(server, witness) as work:
                await work.fetch(*_task(owner, "in a transaction"))
            async with _work(server, witness, single_statement=True) as work:
                await work.fetch(*_task(owner, "alone"))  # on the pool's one connection
    finally:
        await server.aclose()
    assert inside == [True, False]
    assert await _count(engine, "tasks", owner) == 2
