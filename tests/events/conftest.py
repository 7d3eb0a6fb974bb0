"""One delivery pipeline per test: the API in-process, a private Redis as the broker, an
SMTP server (not yet listening) and `taskapp worker` processes the test starts itself.

The module has a database of its own: a worker's sweep picks up every pending row of its
database, and rows left by other test modules must not turn into mail here."""

from __future__ import annotations

import contextlib
import html
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from kombu import Connection
from sqlalchemy import text

from taskapp.app import create_app
from taskapp.config import SMTPSettings
from taskapp.database.migrations import upgrade_database
from testing.mail import MailServer, Received
from testing.oidc import OIDCProvider
from testing.pgbouncer import pgbouncer
from testing.polling import eventually
from testing.processes import Worker, clean_env
from testing.services import PrivateRedis, is_listening, private_redis, scratch_database
from tests.conftest import SettingsFactory, app_state, running

GRACE = 1
SWEEP_INTERVAL = 1
BACKOFF = 0.5
BACKOFF_MAX = 2


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    task_id: uuid.UUID
    status: str
    attempts: int
    last_error: str | None
    recipient: str | None


@dataclass
class Delivery:
    app: FastAPI
    client: httpx.AsyncClient
    oidc: OIDCProvider
    broker: PrivateRedis | None
    broker_url: str
    mail: MailServer
    queue: str
    database_url: str
    directory: Path
    workers: list[Worker] = field(default_factory=list)

    def worker_env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            TASKAPP_ENV="test",
            TASKAPP_LOG_LEVEL="INFO",
            TASKAPP_DATABASE_URL=self.database_url,
            TASKAPP_REDIS_URL=self.broker.url if self.broker else "redis://127.0.0.1:6379/0",
            TASKAPP_BROKER_URL=self.broker_url,
            TASKAPP_SMTP_URL=self.mail.url,
            TASKAPP_NOTIFICATIONS_QUEUE=self.queue,
            TASKAPP_NOTIFICATIONS_GRACE=str(GRACE),
            TASKAPP_NOTIFICATIONS_SWEEP_INTERVAL=str(SWEEP_INTERVAL),
            TASKAPP_NOTIFICATIONS_BACKOFF=str(BACKOFF),
            TASKAPP_NOTIFICATIONS_BACKOFF_MAX=str(BACKOFF_MAX),
            **extra,
        )

    def start_worker(self, *args: str, **env: str) -> Worker:
        """A ready worker; `--pool solo` unless `args` say otherwise."""
        worker = Worker(
            list(args) or ["--pool", "solo", "--concurrency", "1"],
            self.worker_env(**env),
            self.directory / f"worker-{len(self.workers) + 1}",
        )
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()

    async def create(
        self, title: str, headers: dict[str, str] | None = None
    ) -> tuple[uuid.UUID, float]:
        """POST /tasks as alice (or `headers`); the task id and how long the POST took."""
        start = time.monotonic()
        response = await self.client.post(
            "/tasks",
            json={"title": title, "description": f"about {title}", "status": "in_progress"},
            headers=headers or self.oidc.auth("alice"),
        )
        elapsed = time.monotonic() - start
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"]), elapsed

    async def row(self, task_id: uuid.UUID) -> Row:
        """The creation event of a task, with its e-mail delivery."""
        async with app_state(self.app).engine.connect() as connection:
            result = await connection.execute(
                text(
                    "SELECT e.id, e.aggregate_id, d.status, d.attempts, d.last_error, d.target"
                    " FROM events e JOIN deliveries d ON d.event_id = e.id"
                    " WHERE e.aggregate_id = :task_id AND d.consumer = 'email'"
                ),
                {"task_id": task_id},
            )
            [row] = result.all()
        return Row(*row)

    async def wait_row(self, task_id: uuid.UUID, status: str, within: float = 15) -> Row:
        async def reached() -> bool:
            return (await self.row(task_id)).status == status

        await eventually(reached, f"notification of {task_id} to be {status}", within)
        return await self.row(task_id)

    async def wait_messages(self, count: int, within: float = 15) -> float:
        async def arrived() -> bool:
            return len(self.mail.messages) >= count

        return await eventually(arrived, f"{count} message(s) at the SMTP server", within)

    def message_for(self, row: Row) -> Received:
        """The one message of a notification, checked against the task and the recipient."""
        wanted = f"<{row.id}@taskapp>"
        matching = [m for m in self.mail.messages if m.message["Message-ID"] == wanted]
        assert len(matching) == 1, [m.message["Message-ID"] for m in self.mail.messages]
        return matching[0]


def assert_delivered(received: Received, row: Row, title: str) -> None:
    assert received.rcpt_tos == ["alice@example.com"]
    assert received.message["To"] == "alice@example.com"
    assert received.message["Message-ID"] == f"<{row.id}@taskapp>"
    assert title in received.message["Subject"]
    assert title in received.text
    assert f"about {title}" in received.text
    assert str(row.task_id) in received.text
    assert html.escape(title) in received.html


@pytest.fixture(scope="module")
def outbox_database_url(postgres_admin_url: str) -> Iterator[str]:
    with scratch_database(postgres_admin_url, prefix="taskapp_notify") as url:
        upgrade_database(url)
        yield url


@contextlib.asynccontextmanager
async def _pipeline(
    make_settings: SettingsFactory,
    database_url: str,
    oidc: OIDCProvider,
    directory: Path,
    broker_url: str,
    broker: PrivateRedis | None,
    database: dict[str, Any] | None = None,
) -> AsyncIterator[Delivery]:
    queue = f"test-notify-{uuid.uuid4().hex[:12]}"
    mail = MailServer()
    notifications: dict[str, Any] = {
        "enabled": True,
        "queue": queue,
        "grace": GRACE,
        "sweep_interval": SWEEP_INTERVAL,
        "backoff": BACKOFF,
        "backoff_max": BACKOFF_MAX,
    }
    # Only the broker is private: the API's cache and rate limiter stay on the session
    # Redis, so stopping the broker affects nothing but the outbox.
    settings = make_settings(
        database={"url": database_url, **(database or {})},
        notifications=notifications,
        broker_url=broker_url,
        smtp=SMTPSettings(_env_file=None, url=mail.url),
    )
    app = create_app(settings)
    try:
        async with running(app) as client:
            async with app_state(app).engine.begin() as connection:
                await connection.execute(text("TRUNCATE tasks, events, deliveries"))
            pipeline = Delivery(
                app=app,
                client=client,
                oidc=oidc,
                broker=broker,
                broker_url=broker_url,
                mail=mail,
                queue=queue,
                database_url=database_url,
                directory=directory,
            )
            try:
                yield pipeline
            finally:
                pipeline.stop_workers()
    finally:
        mail.stop()


@pytest.fixture
async def delivery(
    make_settings: SettingsFactory,
    outbox_database_url: str,
    oidc: OIDCProvider,
    tmp_path: Path,
) -> AsyncIterator[Delivery]:
    """The pipeline with a private Redis as its broker (which a test may stop)."""
    with private_redis(tmp_path / "broker") as broker:
        async with _pipeline(
            make_settings, outbox_database_url, oidc, tmp_path, broker.url, broker
        ) as pipeline:
            yield pipeline


RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
async def rabbitmq_delivery(
    make_settings: SettingsFactory,
    outbox_database_url: str,
    oidc: OIDCProvider,
    tmp_path: Path,
) -> AsyncIterator[Delivery]:
    """The pipeline with RabbitMQ as its broker (the one on 127.0.0.1:5672)."""
    if not is_listening("127.0.0.1", 5672):
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    async with _pipeline(
        make_settings, outbox_database_url, oidc, tmp_path, RABBITMQ, None
    ) as pipeline:
        try:
            yield pipeline
        finally:
            with Connection(RABBITMQ) as connection:  # our queue is durable: remove it
                connection.default_channel.queue_delete(pipeline.queue)  # type: ignore[attr-defined]


@pytest.fixture
async def pgbouncer_delivery(
    make_settings: SettingsFactory,
    outbox_database_url: str,
    oidc: OIDCProvider,
    tmp_path: Path,
) -> AsyncIterator[Delivery]:
    """The pipeline with the API and the workers on PgBouncer in transaction mode, sharing
    one server connection."""
    with (
        private_redis(tmp_path / "broker") as broker,
        pgbouncer(outbox_database_url, pool_size=1) as bouncer,
    ):
        async with _pipeline(
            make_settings,
            bouncer.url,
            oidc,
            tmp_path,
            broker.url,
            broker,
            database={"pgbouncer": True},
        ) as pipeline:
            yield pipeline
