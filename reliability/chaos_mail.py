"""The notification pipeline under load: a broker, `taskapp worker`s and a mail server of the
run's own, each stopped (or killed) and started while tasks are being created; afterwards
every task answered 201 must have its mail exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import asyncpg

from reliability.chaos_scenarios import (
    Check,
    Options,
    Report,
    log_checks,
    make_report,
    new_load,
    took,
    under_load,
)
from reliability.chaos_stack import Instance, Stack
from testing.mail import MailServer
from testing.processes import Worker
from testing.services import PrivateRedis

# Short delays, so a run settles in seconds: retries back off from 0.5 s to at most 2 s,
# and beat re-enqueues rows still pending 1 s after they were due, every second.
PIPELINE = {
    "TASKAPP_NOTIFICATIONS_GRACE": "1",
    "TASKAPP_NOTIFICATIONS_SWEEP_INTERVAL": "1",
    "TASKAPP_NOTIFICATIONS_BACKOFF": "0.5",
    "TASKAPP_NOTIFICATIONS_BACKOFF_MAX": "2",
}

# Seconds the pipeline may take to send what the load created (solo workers here send a
# few dozen mails a second).
SETTLE = 300


async def _notifications(stack: Stack, prefix: str) -> dict[str, tuple[str, str, int]]:
    """task id -> (event id, status, attempts) of the e-mail deliveries of the tasks whose
    title starts with `prefix`."""
    connection = await asyncpg.connect(stack.postgres.dsn)
    try:
        rows = await connection.fetch(
            "SELECT e.aggregate_id::text AS task, e.id::text AS id, d.status, d.attempts"
            " FROM events e JOIN deliveries d ON d.event_id = e.id AND d.consumer = 'email'"
            " JOIN tasks t ON t.id = e.aggregate_id WHERE t.title LIKE $1",
            prefix + "%",
        )
    finally:
        await connection.close()
    return {row["task"]: (row["id"], row["status"], row["attempts"]) for row in rows}


async def mail_faults(stack: Stack, options: Options) -> Report:
    """Broker down and up, a worker killed (SIGKILL) while the mail server is down, the mail
    server down and up, a worker stopped (SIGTERM, warm shutdown) while mail flows."""
    stack = stack.with_mail_database()
    work: Path = options.work / "mail"
    broker = PrivateRedis(work / "broker")
    broker.start()
    mail = MailServer()
    mail.start()
    env = stack.env(TASKAPP_BROKER_URL=broker.url, TASKAPP_SMTP_URL=mail.url, **PIPELINE)
    instance = Instance(work / "api", env)
    workers: list[Worker] = []

    def worker() -> Worker:
        # INFO: the worker says " ready." at that level, which `wait_ready` waits for.
        started = Worker(
            ["--pool", "solo", "--concurrency", "1"],
            {**env, "TASKAPP_LOG_LEVEL": "INFO"},
            work / f"worker-{len(workers) + 1}",
        )
        workers.append(started)
        started.wait_ready()
        return started

    settle: list[float | None] = []
    try:
        await asyncio.to_thread(instance.start)
        first = await asyncio.to_thread(worker)
        second = await asyncio.to_thread(worker)
        load = new_load(stack, instance.base_url, options)

        async def fault() -> None:
            step = max(1.0, options.duration / 5)
            await asyncio.sleep(step)
            broker.stop()  # killed: jobs published meanwhile are lost to it, rows are not
            await asyncio.sleep(options.outage)
            broker.start()
            await asyncio.sleep(step)
            mail.stop()
            await asyncio.sleep(options.outage / 2)
            first.kill()  # its job is in retries: nothing is between accepted and committed
            await asyncio.to_thread(worker)
            await asyncio.sleep(options.outage / 2)
            mail.start()
            await asyncio.sleep(step)
            await asyncio.to_thread(second.stop)  # warm shutdown while mail flows
            await asyncio.to_thread(worker)
            await asyncio.sleep(step)

        await under_load(load, fault)
        prefix = f"chaos {load.run} "
        started = time.monotonic()
        while True:
            rows = await _notifications(stack, prefix)
            pending = [task for task in load.created if rows.get(task, ("", "", 0))[1] != "sent"]
            if not pending:
                settle.append(time.monotonic() - started)
                break
            if time.monotonic() - started > SETTLE:
                settle.append(None)
                break
            await asyncio.sleep(0.5)
    finally:
        for each in workers:
            each.stop()
        instance.kill()
        mail.stop()
        broker.stop()
    sent_ids = Counter(str(m.message["Message-ID"]) for m in mail.messages)
    expected = {f"<{rows[task][0]}@taskapp>" for task in load.created if task in rows}
    missing = [task for task in load.created if f"<{rows.get(task, ('?', '', 0))[0]}@taskapp>"
               not in sent_ids]  # fmt: skip
    doubled = [mid for mid, n in sent_ids.items() if n > 1]
    unexpected = [mid for mid in sent_ids if mid not in expected]
    posts = [a for a in load.answers if a.method == "POST"]
    retried = sum(1 for _, _, attempts in rows.values() if attempts > 1)
    checks = [
        Check(
            "every POST answered 201 (broker, worker, mail faults unseen)",
            f"{sum(1 for a in posts if a.status == 201)}/{len(posts)}",
            bool(posts) and all(a.status == 201 for a in posts),
        ),
        took(f"every notification sent, after the load (within {SETTLE} s)", settle[0]),
        Check(
            "mails: one per task answered 201",
            f"{len(sent_ids)} for {len(load.created)}",
            not missing,
        ),
        Check(
            "the faults were felt: notifications sent after a failed attempt",
            str(retried),
            retried > 0,
        ),
        Check("no mail twice (same Message-ID)", str(len(doubled)), not doubled),
        Check("no mail for a task not answered 201", str(len(unexpected)), not unexpected),
        *log_checks(instance),
    ]
    return await make_report("mail", stack, load, checks)
