"""End to end: POST /tasks → the event and its e-mail delivery in the outbox → Celery (a real
`taskapp worker`, a real Redis broker) → a real SMTP server. Every test ends with exactly one
message per task that has a recipient, or with none, and waits a little longer than needed
to catch a second one."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import pytest
import redis
from sqlalchemy import text

from taskapp.events.celery_app import DELIVER_EVENTS_JOB, DELIVER_JOB, create_celery
from testing.polling import eventually
from tests.conftest import app_state
from tests.events.conftest import Delivery, Row, assert_delivered

pytestmark = pytest.mark.slow

# After the expected outcome, wait this long more: a duplicate (or a late attempt) would
# come by then, as the sweep runs every second with a grace of one second.
SETTLE = 2.5


async def _settled_one_message(delivery: Delivery, task_id: uuid.UUID, title: str) -> Row:
    """Wait for the task's message, then a while longer; exactly that one message."""
    await delivery.wait_messages(1)
    await asyncio.sleep(SETTLE)
    row = await delivery.row(task_id)
    assert row.status == "sent", row
    assert len(delivery.mail.messages) == 1, [m.message["Subject"] for m in delivery.mail.messages]
    assert_delivered(delivery.message_for(row), row, title)
    return row


async def _attempted(delivery: Delivery, task_id: uuid.UUID, attempts: int) -> Row:
    """Wait until the worker has failed `attempts` times to send (the row still pending)."""

    async def failed_enough() -> bool:
        return (await delivery.row(task_id)).attempts >= attempts

    await eventually(failed_enough, f"{attempts} failed attempts")
    return await delivery.row(task_id)


def _queued_jobs(delivery: Delivery) -> list[tuple[str, list[str]]]:
    """The jobs waiting in the broker's queue: (name, first argument)."""
    client = redis.Redis.from_url(delivery.broker_url)
    try:
        raw = client.lrange(delivery.queue, 0, -1)
    finally:
        client.close()
    jobs = []
    for item in reversed(raw):  # kombu pushes to the left: oldest last
        message = json.loads(item)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        jobs.append((message["headers"]["task"], args[0]))
    return jobs


async def test_tasks_created_together_are_published_as_one_job(delivery: Delivery) -> None:
    # No worker yet: what the API publishes waits in the broker's queue, where it is read.
    created = await asyncio.gather(*(delivery.create(f"Errand {n}") for n in range(10)))

    async def published() -> bool:
        return sum(len(ids) for _, ids in _queued_jobs(delivery)) >= len(created)

    await eventually(published, "every event published")
    jobs = _queued_jobs(delivery)
    assert {name for name, _ in jobs} == {DELIVER_EVENTS_JOB}
    assert len(jobs) < len(created)
    rows = [await delivery.row(task_id) for task_id, _ in created]
    assert sorted(i for _, ids in jobs for i in ids) == sorted(str(row.id) for row in rows)

    delivery.mail.start()
    delivery.start_worker()
    await delivery.wait_messages(len(created))
    await asyncio.sleep(SETTLE)
    assert len(delivery.mail.messages) == len(created)
    for n, (task_id, _) in enumerate(created):
        row = await delivery.row(task_id)
        assert (row.status, row.attempts) == ("sent", 1)
        assert_delivered(delivery.message_for(row), row, f"Errand {n}")


async def test_a_created_task_is_mailed_to_its_creator_once(delivery: Delivery) -> None:
    delivery.mail.start()
    delivery.start_worker()

    task_id, _ = await delivery.create("Write the report")
    took = await delivery.wait_messages(1)

    assert took < 5
    row = await _settled_one_message(delivery, task_id, "Write the report")
    assert row.attempts == 1
    assert row.recipient == "alice@example.com"


async def test_mail_server_down_at_first_is_retried_until_it_is_up(delivery: Delivery) -> None:
    delivery.start_worker()  # and nothing listens on the SMTP port yet

    task_id, _ = await delivery.create("Call the bank")
    failing = await _attempted(delivery, task_id, 2)

    assert failing.status == "pending"
    assert "refused" in (failing.last_error or "").lower(), failing
    assert delivery.mail.messages == []

    delivery.mail.start()
    row = await _settled_one_message(delivery, task_id, "Call the bank")
    assert row.attempts > failing.attempts


async def test_broker_down_during_the_post_loses_nothing(delivery: Delivery) -> None:
    delivery.mail.start()
    delivery.start_worker()

    assert delivery.broker is not None
    delivery.broker.stop()
    task_id, took = await delivery.create("Renew the passport")

    assert took < 1
    await asyncio.sleep(1.5)  # the row is past its grace period while the broker is down
    assert (await delivery.row(task_id)).status == "pending"
    assert delivery.mail.messages == []

    delivery.broker.start()  # same port, empty: the job published by the POST never was
    await _settled_one_message(delivery, task_id, "Renew the passport")


async def test_a_worker_killed_while_retrying_is_replaced_and_mails_once(
    delivery: Delivery,
) -> None:
    first = delivery.start_worker()  # the mail server is down: the job is in its retries
    task_id, _ = await delivery.create("Book the flights")
    await _attempted(delivery, task_id, 1)

    first.kill()
    failing = await delivery.row(task_id)
    assert failing.status == "pending"

    delivery.mail.start()
    delivery.start_worker()
    row = await _settled_one_message(delivery, task_id, "Book the flights")
    assert row.attempts > failing.attempts


async def test_the_same_job_delivered_twice_sends_one_mail(delivery: Delivery) -> None:
    # Two pool processes and a slow mail server: the copies of the job run at the same time.
    delivery.mail.mailbox.delay = 0.5
    delivery.mail.start()
    delivery.start_worker("--pool", "prefork", "--concurrency", "2")
    celery = create_celery(app_state(delivery.app).settings)
    try:
        task_id, _ = await delivery.create("Pay the rent")
        event_id = str((await delivery.row(task_id)).id)
        for _ in range(2):
            celery.send_task(DELIVER_JOB, args=[event_id, "email"])
        celery.send_task(DELIVER_EVENTS_JOB, args=[[event_id]])

        await _settled_one_message(delivery, task_id, "Pay the rent")

        # Once more after it was sent: still nothing new.
        celery.send_task(DELIVER_JOB, args=[event_id, "email"])
        celery.send_task(DELIVER_EVENTS_JOB, args=[[event_id]])
        await asyncio.sleep(SETTLE)
    finally:
        celery.close()
    assert len(delivery.mail.messages) == 1
    assert (await delivery.row(task_id)).attempts == 1


async def test_a_permanent_rejection_fails_after_one_attempt(delivery: Delivery) -> None:
    delivery.mail.mailbox.rcpt_reply = "550 5.1.1 No such user here"
    delivery.mail.start()
    delivery.start_worker()

    task_id, _ = await delivery.create("Water the plants")
    await delivery.wait_row(task_id, "failed")
    await asyncio.sleep(SETTLE)

    row = await delivery.row(task_id)
    assert (row.status, row.attempts) == ("failed", 1)
    assert "550" in (row.last_error or ""), row
    assert delivery.mail.mailbox.rcpt_attempts == 1
    assert delivery.mail.messages == []


async def test_temporary_failures_fail_after_the_maximum_attempts(delivery: Delivery) -> None:
    delivery.mail.mailbox.data_reply = "451 4.3.0 Try again later"
    delivery.mail.start()
    delivery.start_worker(TASKAPP_NOTIFICATIONS_MAX_ATTEMPTS="2")

    task_id, _ = await delivery.create("Fix the bike")
    await delivery.wait_row(task_id, "failed")
    await asyncio.sleep(SETTLE)

    row = await delivery.row(task_id)
    assert (row.status, row.attempts) == ("failed", 2)
    assert "451" in (row.last_error or ""), row
    assert delivery.mail.mailbox.data_attempts == 2
    assert delivery.mail.messages == []


async def test_a_creator_without_an_email_claim_gets_no_mail(delivery: Delivery) -> None:
    delivery.mail.start()
    delivery.start_worker()

    carols, _ = await delivery.create("Carol's task", delivery.oidc.auth("carol", email=None))
    # Alice's task after Carol's: once its mail is in, the worker has had Carol's row too.
    alices, _ = await delivery.create("Alice's task")
    await _settled_one_message(delivery, alices, "Alice's task")

    skipped = await delivery.row(carols)
    assert (skipped.status, skipped.attempts, skipped.recipient) == ("skipped", 0, None)


async def test_post_latency_does_not_depend_on_the_mail_server(delivery: Delivery) -> None:
    delivery.mail.mailbox.delay = 3
    delivery.mail.start()
    delivery.start_worker()

    first, first_took = await delivery.create("First slow mail")

    async def smtp_busy() -> bool:
        return delivery.mail.mailbox.data_attempts >= 1

    await eventually(smtp_busy, "the worker to be in the SMTP conversation")
    second, second_took = await delivery.create("Second slow mail")

    assert first_took < 1
    assert second_took < 1
    await delivery.wait_messages(2)
    await asyncio.sleep(SETTLE)
    assert len(delivery.mail.messages) == 2
    for task_id, title in ((first, "First slow mail"), (second, "Second slow mail")):
        row = await delivery.row(task_id)
        assert (row.status, row.attempts) == ("sent", 1)
        assert_delivered(delivery.message_for(row), row, title)


async def test_rabbitmq_works_as_the_broker_too(rabbitmq_delivery: Delivery) -> None:
    rabbitmq_delivery.mail.start()
    rabbitmq_delivery.start_worker()

    task_id, took = await rabbitmq_delivery.create("Through RabbitMQ")
    assert took < 1
    await rabbitmq_delivery.wait_messages(1)
    row = await _settled_one_message(rabbitmq_delivery, task_id, "Through RabbitMQ")
    assert row.attempts == 1


async def test_mail_goes_out_through_pgbouncer(pgbouncer_delivery: Delivery) -> None:
    pgbouncer_delivery.mail.start()
    pgbouncer_delivery.start_worker(
        "--pool", "prefork", "--concurrency", "2", TASKAPP_DATABASE_PGBOUNCER="true"
    )

    created = [await pgbouncer_delivery.create(f"Pooled {n}") for n in range(6)]
    await pgbouncer_delivery.wait_messages(6)
    await asyncio.sleep(SETTLE)
    assert len(pgbouncer_delivery.mail.messages) == 6
    for n, (task_id, _) in enumerate(created):
        row = await pgbouncer_delivery.row(task_id)
        assert (row.status, row.attempts) == ("sent", 1)
        assert_delivered(pgbouncer_delivery.message_for(row), row, f"Pooled {n}")


async def test_a_message_that_cannot_be_built_fails_once_instead_of_looping(
    delivery: Delivery,
) -> None:
    """A delivery whose recipient the mail library cannot parse (written before addresses were
    checked this strictly, say) is marked failed on its first attempt, not retried forever
    by the sweep."""
    delivery.mail.start()
    delivery.start_worker()
    task_id, event_id = uuid.uuid4(), uuid.uuid4()
    async with app_state(delivery.app).engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO events (id, kind, aggregate_id, owner, actor, payload)"
                " VALUES (:id, 'task_created', :task_id, 'alice', 'alice', :payload)"
            ),
            {
                "id": event_id,
                "task_id": task_id,
                "payload": '{"title": "t", "description": null, "status": "pending"}',
            },
        )
        await connection.execute(
            text(
                "INSERT INTO deliveries (event_id, consumer, target)"
                " VALUES (:id, 'email', 'x@[b.c')"
            ),
            {"id": event_id},
        )
    row = await delivery.wait_row(task_id, "failed")
    await asyncio.sleep(2.5)  # several sweeps later
    row = await delivery.row(task_id)
    assert row.status == "failed"
    assert row.attempts == 1
    assert delivery.mail.messages == []
