"""End to end: assigning someone to a task → their e-mail, through the outbox, Celery (a real
`taskapp worker`) and a real SMTP server: one message per assignment by someone else, across
a mail server that is down at first."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text

from testing.polling import eventually
from tests.conftest import app_state
from tests.events.conftest import Delivery
from tests.fixtures.projects import project, seen_by_directory, share

pytestmark = pytest.mark.slow

SETTLE = 2.5  # a duplicate (or a late attempt) would come by then


async def _assignments(delivery: Delivery, task_id: str) -> list[tuple[str, str, int, str]]:
    """(assignee, delivery status, attempts, target) of the task's assignment events."""
    async with app_state(delivery.app).engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT e.payload->>'assignee', d.status, d.attempts, d.target"
                " FROM events e JOIN deliveries d ON d.event_id = e.id"
                " WHERE e.aggregate_id = :task AND e.kind = 'task_assigned'"
                " ORDER BY e.payload->>'assignee'"
            ),
            {"task": uuid.UUID(task_id)},
        )
        return [tuple(row) for row in rows]


async def _team(delivery: Delivery) -> tuple[str, dict[str, dict[str, str]]]:
    auth = {user: delivery.oidc.auth(user) for user in ("alice", "bob", "carol")}
    await seen_by_directory(delivery.client, *auth.values())
    team = await project(delivery.client, auth["alice"], "Launch <Q1>")
    await share(delivery.client, auth["alice"], team, "bob", "editor")
    await share(delivery.client, auth["alice"], team, "carol", "viewer")
    return team, auth


async def test_each_assignment_by_someone_else_is_mailed_once(delivery: Delivery) -> None:
    team, auth = await _team(delivery)
    delivery.mail.start()
    delivery.start_worker()

    made = await delivery.client.post(
        "/tasks",
        json={"title": "Ship it", "project_id": team, "assignees": ["bob", "alice"]},
        headers=auth["alice"],
    )
    assert made.status_code == 201, made.text
    task_id = made.json()["id"]
    # The creation mail to alice, the assignment mail to bob; none to alice for assigning
    # herself.
    await delivery.wait_messages(2)
    # Bob stays assigned (no new mail), carol is added by bob (one mail to her).
    changed = await delivery.client.patch(
        f"/tasks/{task_id}", json={"assignees": ["bob", "carol"]}, headers=auth["bob"]
    )
    assert changed.status_code == 200, changed.text
    await delivery.wait_messages(3)
    await asyncio.sleep(SETTLE)

    assigned = [m for m in delivery.mail.messages if m.message["Subject"].startswith("Assigned")]
    assert sorted(m.rcpt_tos[0] for m in assigned) == ["bob@example.com", "carol@example.com"]
    assert len(delivery.mail.messages) == 3
    to_bob = next(m for m in assigned if m.rcpt_tos == ["bob@example.com"])
    assert to_bob.message["Subject"] == "Assigned to you: Ship it"
    assert "alice assigned a task to you" in to_bob.text
    assert "Launch <Q1>" in to_bob.text
    assert "Launch &lt;Q1&gt;" in to_bob.html
    assert f"http://localhost:8000/tasks/{task_id}" in to_bob.text
    rows = await _assignments(delivery, task_id)
    assert rows == [
        ("bob", "sent", 1, "bob@example.com"),
        ("carol", "sent", 1, "carol@example.com"),
    ]
    ids = {m.message["Message-ID"] for m in assigned}
    assert len(ids) == 2  # one per assignment, stable across resends


async def test_an_assignment_mail_waits_for_the_mail_server(delivery: Delivery) -> None:
    team, auth = await _team(delivery)
    delivery.start_worker()  # and nothing listens on the SMTP port yet
    made = await delivery.client.post(
        "/tasks",
        json={"title": "Call the bank", "project_id": team, "assignees": ["carol"]},
        headers=auth["bob"],
    )
    task_id = made.json()["id"]

    async def failed_twice() -> bool:
        return (await _assignments(delivery, task_id))[0][2] >= 2

    await eventually(failed_twice, "two failed attempts")
    assert delivery.mail.messages == []
    delivery.mail.start()
    await delivery.wait_messages(2)  # bob's creation mail, carol's assignment
    await asyncio.sleep(SETTLE)
    assert sorted(m.rcpt_tos[0] for m in delivery.mail.messages) == [
        "bob@example.com",
        "carol@example.com",
    ]
    ((assignee, status, _, _),) = await _assignments(delivery, task_id)
    assert (assignee, status) == ("carol", "sent")
