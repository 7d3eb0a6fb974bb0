"""The API side of the outbox: the event and its e-mail delivery, written with the task;
recipients; rendering of the message."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import time
import uuid
from email.message import EmailMessage
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from taskapp.app import create_app
from taskapp.events.consumers.email import is_permanent, message_id, render, usable_address
from taskapp.events.models import Event
from testing.oidc import OIDCProvider
from tests.conftest import SettingsFactory, app_state, running
from tests.fixtures.metrics import sample
from tests.fixtures.tasks import task_queries


async def _notifications(app: FastAPI) -> list[dict[str, Any]]:
    """Each event with its e-mail delivery, as the rows the outbox holds."""
    async with app_state(app).engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT e.id, e.kind, e.aggregate_id AS task_id, e.owner, e.actor, e.payload,"
                " d.consumer, d.target AS recipient, d.status, d.attempts"
                " FROM events e LEFT JOIN deliveries d ON d.event_id = e.id"
                " ORDER BY e.created_at"
            )
        )
        return [dict(row) for row in rows.mappings()]


async def _clean(app: FastAPI) -> None:
    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks, events, deliveries"))


def notifying_app(make_settings: SettingsFactory, **oidc: Any) -> FastAPI:
    """Notifications enabled, but with no reachable broker: rows are recorded, publishing
    fails quietly."""
    return create_app(
        make_settings(
            notifications={"enabled": True, "queue": f"test-{uuid.uuid4().hex}"},
            oidc_=oidc or None,
            broker_url="redis://127.0.0.1:9/0",
        )
    )


@pytest.fixture
async def notifying(make_settings: SettingsFactory) -> Any:
    app = notifying_app(make_settings)
    async with running(app) as client:
        yield app, client
        await _clean(app)


async def test_creating_a_task_records_one_pending_notification(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider
):
    app, client = notifying
    created = await client.post(
        "/tasks",
        json={"title": "Write report", "description": "Q3", "status": "in_progress"},
        headers=oidc.auth("alice"),
    )
    assert created.status_code == 201
    [row] = await _notifications(app)
    assert row["task_id"] == uuid.UUID(created.json()["id"])
    assert row["owner"] == "alice"
    assert row["actor"] == "alice"
    assert row["consumer"] == "email"
    assert row["recipient"] == "alice@example.com"
    assert row["status"] == "pending"
    assert row["kind"] == "task_created"
    assert row["payload"] == {
        "title": "Write report",
        "description": "Q3",
        "status": "in_progress",
        "email": "alice@example.com",
    }


async def test_the_task_and_its_notification_are_inserted_by_one_statement(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider
):
    app, client = notifying
    with task_queries(app) as statements:
        response = await client.post("/tasks", json={"title": "x"}, headers=oidc.auth())
    assert response.status_code == 201
    [statement] = statements
    assert "INSERT INTO events" in statement
    assert "INSERT INTO deliveries" in statement
    assert "INSERT INTO tasks" in statement


async def test_a_task_whose_notification_fails_is_not_stored(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider
):
    """The task and its outbox row commit together or not at all."""
    app, client = notifying
    async with app_state(app).engine.begin() as connection:
        await connection.execute(
            text(
                "CREATE FUNCTION test_refuse_notification() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN IF NEW.payload->>'title' = 'refused' THEN"
                " RAISE EXCEPTION 'refused by test'; END IF; RETURN NEW; END $$"
            )
        )
        await connection.execute(
            text(
                "CREATE TRIGGER test_refuse_notification AFTER INSERT ON events"
                " FOR EACH ROW EXECUTE FUNCTION test_refuse_notification()"
            )
        )
    try:
        refused = await client.post("/tasks", json={"title": "refused"}, headers=oidc.auth())
        accepted = await client.post("/tasks", json={"title": "accepted"}, headers=oidc.auth())
    finally:
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("DROP TRIGGER test_refuse_notification ON events"))
            await connection.execute(text("DROP FUNCTION test_refuse_notification()"))
    assert refused.status_code == 500
    assert accepted.status_code == 201
    async with app_state(app).engine.connect() as connection:
        titles = (await connection.execute(text("SELECT title FROM tasks"))).scalars().all()
    assert "refused" not in titles
    assert "accepted" in titles
    [row] = await _notifications(app)
    assert row["payload"]["title"] == "accepted"


@pytest.mark.parametrize(
    "email",
    [
        None,
        "",
        "not-an-address",
        "a@b",
        "x@y.z,evil@example.com",
        "a\r\nbcc: evil@x.y@z.com",
        "x@[b.c",  # crashes the standard library's header parser
        "a:b@c.d",  # a group: would mail b@c.d
        "a(b@c.d",  # a comment: no domain left
        "Alice <alice@example.com>",
        "ü@exämple.de",
    ],
)
async def test_no_usable_address_is_recorded_as_skipped(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider, email: str | None
):
    app, client = notifying
    skipped = sample("taskapp_notifications_total", outcome="skipped")
    response = await client.post(
        "/tasks", json={"title": "x"}, headers=oidc.auth("carol", email=email)
    )
    assert response.status_code == 201
    [row] = await _notifications(app)
    assert row["status"] == "skipped"
    assert row["recipient"] is None
    assert sample("taskapp_notifications_total", outcome="skipped") == skipped + 1


@pytest.mark.parametrize("verified", [False, None, "true", 1])
async def test_an_unverified_address_is_skipped(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider, verified: Any
):
    """Anyone may type another's address into a self-service profile: only an address the
    provider marks verified (`email_verified: true`, the JSON boolean) gets mail."""
    app, client = notifying
    response = await client.post(
        "/tasks",
        json={"title": "x"},
        headers=oidc.auth("carol", email="carol@example.com", email_verified=verified),
    )
    assert response.status_code == 201
    [row] = await _notifications(app)
    assert row["status"] == "skipped"
    assert row["recipient"] is None


async def test_an_unverified_address_is_mailed_when_allowed(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    app = notifying_app(make_settings, accept_unverified_email=True)
    async with running(app) as client:
        try:
            response = await client.post(
                "/tasks",
                json={"title": "x"},
                headers=oidc.auth("carol", email="carol@example.com", email_verified=False),
            )
            assert response.status_code == 201
            [row] = await _notifications(app)
            assert row["status"] == "pending"
            assert row["recipient"] == "carol@example.com"
        finally:
            await _clean(app)


async def test_disabled_notifications_record_nothing(client: httpx.AsyncClient, app: FastAPI, oidc):
    assert (
        await client.post("/tasks", json={"title": "x"}, headers=oidc.auth())
    ).status_code == 201
    assert await _notifications(app) == []


async def test_rejected_task_records_no_notification(
    notifying: tuple[FastAPI, httpx.AsyncClient], oidc: OIDCProvider
):
    app, client = notifying
    response = await client.post("/tasks", json={"title": ""}, headers=oidc.auth("alice"))
    assert response.status_code == 422
    assert await _notifications(app) == []


def _notification(**payload: Any) -> Event:
    return Event(
        id=uuid.UUID("8f1b56cf-0911-4071-b993-f590ce9236e1"),
        kind="task_created",
        aggregate_id=uuid.UUID("e927cebe-7450-4406-9c84-8c0a8582aff6"),
        owner="alice",
        actor="alice",
        payload={"title": "Write report", "description": "Q3 <numbers>", "status": "in_progress"}
        | payload,
    )


def _body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body((subtype,))
    assert part is not None
    return str(part.get_content())


def test_message_carries_the_task_and_a_stable_message_id():
    message = render(_notification(), "alice@example.com", "taskapp <noreply@example.com>")
    assert message["Subject"] == "New task: Write report"
    assert message["To"] == "alice@example.com"
    assert message["From"] == "taskapp <noreply@example.com>"
    assert message["Message-ID"] == "<8f1b56cf-0911-4071-b993-f590ce9236e1@taskapp>"
    assert message_id(_notification()) == message["Message-ID"]
    plain = _body(message, "plain")
    rich = _body(message, "html")
    for part in (plain, rich):
        assert "Write report" in part
        assert "in progress" in part
        assert "e927cebe-7450-4406-9c84-8c0a8582aff6" in part
    assert "Q3 <numbers>" in plain
    assert "Q3 &lt;numbers&gt;" in rich  # user text is escaped in HTML


def test_a_title_cannot_inject_headers():
    message = render(
        _notification(title="Hi\r\nBcc: evil@example.com"), "a@example.com", "n@example.com"
    )
    assert "\n" not in message["Subject"]
    assert "\r" not in message["Subject"]
    assert message["Bcc"] is None
    assert b"\r\nBcc:" not in message.as_bytes()


def test_missing_description_reads_none():
    plain = _body(
        render(_notification(description=None), "a@example.com", "n@example.com"), "plain"
    )
    assert "Description: (none)" in plain


async def test_after_a_failed_publish_the_next_ones_are_left_to_the_sweep(
    notifying: tuple[FastAPI, httpx.AsyncClient],
    oidc: OIDCProvider,
    caplog: pytest.LogCaptureFixture,
):
    """With the broker down, POSTs stay fast and do not each tie up a publishing thread."""
    app, client = notifying
    caplog.set_level(logging.WARNING, logger="taskapp.events.relay")
    assert (
        await client.post("/tasks", json={"title": "1"}, headers=oidc.auth())
    ).status_code == 201
    for _ in range(100):
        if caplog.records:
            break
        await asyncio.sleep(0.05)
    assert len(caplog.records) == 1
    for n in range(5):
        started = time.monotonic()
        response = await client.post("/tasks", json={"title": str(n)}, headers=oidc.auth())
        assert response.status_code == 201
        assert time.monotonic() - started < 0.5
    await asyncio.sleep(0.3)
    assert len(caplog.records) == 1  # no further attempts within the back-off
    assert len(await _notifications(app)) == 6  # every row is kept for the sweep


@pytest.mark.parametrize(
    "email", ["alice@example.com", "Alice.O'Neil+tag@ex-ample.co.uk", "x_y-z@sub.example.org"]
)
def test_plain_addresses_are_usable(email: str):
    assert usable_address(email) == email


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no such user")}), True),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (450, b"mailbox busy")}), False),
        (smtplib.SMTPDataError(554, b"rejected as spam"), True),
        (smtplib.SMTPDataError(451, b"try again later"), False),
        # Our configuration or the server's state, not the message: retried.
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), False),
        (smtplib.SMTPSenderRefused(530, b"authentication required", "n@example.com"), False),
        (smtplib.SMTPConnectError(554, b"no service"), False),
        (ConnectionRefusedError(), False),
    ],
)
def test_only_a_refusal_of_this_message_is_permanent(error: Exception, permanent: bool):
    assert is_permanent(error) is permanent
