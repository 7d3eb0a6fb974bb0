"""The Celery application, configured for at-least-once delivery of the outbox's jobs."""

from __future__ import annotations

from celery import Celery

from taskapp.config import Settings

# One delivery of one event, to one consumer: a retry, or what the sweep re-enqueues.
DELIVER_JOB = "taskapp.deliver"
# Every pending delivery of several events: what the API's relay publishes.
DELIVER_EVENTS_JOB = "taskapp.deliver_events"
SWEEP_JOB = "taskapp.sweep_outbox"


def create_celery(settings: Settings) -> Celery:
    app = Celery("taskapp", broker=settings.celery_broker_url, set_as_current=False)
    app.conf.update(
        # A job is acknowledged only when it finished; a worker that dies mid-job leaves it
        # to be delivered again (the job itself makes a second delivery send nothing).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # On a lost broker connection, running jobs are cancelled and redelivered later
        # (Celery 6's default); the jobs are safe to run twice.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.notifications.queue,
        task_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        # Redis transport: fail fast when the broker is down (the outbox keeps the job),
        # and redeliver an unacknowledged job after an hour at the latest.
        broker_transport_options={
            "visibility_timeout": 3600,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep-outbox": {
                "task": SWEEP_JOB,
                "schedule": settings.notifications.sweep_interval,
            }
        },
    )
    return app
