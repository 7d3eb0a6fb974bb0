"""The fault scenarios of `make chaos`: each starts its own `taskapp serve`, drives load at
it, injects one fault with real processes, and returns its figures and checks."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.chaos_load import Answer, Load, Tally
from reliability.chaos_stack import Instance, Nginx, Stack
from taskapp.database.outages import DatabaseBusyError, DatabaseUnavailableError
from taskapp.database.outages import OutcomeUnknownError as OutcomeUnknown
from taskapp.ratelimit.check import RateLimiterUnavailableError

# What the database's 503s may say: down, busy, or a change whose outcome is unknown.
DATABASE_OUTAGES = {DatabaseUnavailableError.code, DatabaseBusyError.code, OutcomeUnknown.code}


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool


@dataclass
class Report:
    name: str
    tally: Tally
    acknowledged: int  # 201s
    lost: int  # 201s whose task is not in the database
    # creates answered with an error (or not at all) whose task was stored all the same:
    # not lost, but the client was told otherwise (a timeout cannot know)
    stored_anyway: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and all(check.ok for check in self.checks)


@dataclass(frozen=True)
class Options:
    duration: float  # seconds of load per scenario
    outage: float  # seconds a stopped server stays down
    concurrency: int
    work: Path
    think: float = 0.0  # seconds each client waits between its requests


def new_load(stack: Stack, base_url: str, options: Options, **settings: Any) -> Load:
    """A load of `options.concurrency` clients, one user each, with a run id of its own."""
    run = uuid.uuid4().hex[:8]
    return Load(base_url, stack.tokens(run, options.concurrency), run, options.concurrency,
                think=options.think, **settings)  # fmt: skip


async def under_load(load: Load, fault: Callable[[], Awaitable[None]]) -> None:
    """Load from before the fault until after it; every request has its answer on return."""
    driving = asyncio.create_task(load.drive())
    try:
        await fault()
    finally:
        load.stop()
        await driving


async def make_report(name: str, stack: Stack, load: Load, checks: list[Check]) -> Report:
    stored = await stack.postgres.titles(f"chaos {load.run} ")
    lost = [task for task in load.created if task not in stored]
    failed = {a.title: a for a in load.answers if a.title is not None and a.status != 201}
    stored_anyway = [failed[title] for title in stored.values() if title in failed]
    # Stored, yet answered as if certainly not: only "may or may not" (or no answer) is true.
    misleading = [
        a for a in stored_anyway if a.status is not None and a.code != OutcomeUnknown.code
    ]
    checks = [
        *checks,
        Check(
            "creates stored though answered with an error said so",
            ", ".join(sorted({f"{a.status} {a.code}" for a in misleading})[:2]) or "yes",
            not misleading,
        ),
    ]
    tally = Tally.of(load.answers)
    return Report(name, tally, len(load.created), len(lost), len(stored_anyway), checks)


def took(name: str, seconds: float | None) -> Check:
    """A check that something happened (after `seconds`), or failed: it never did."""
    return Check(
        name, "never" if seconds is None else f"after {seconds:.2f} s", seconds is not None
    )


def _no_transport_errors(answers: list[Answer]) -> Check:
    errors = [a for a in answers if a.error]
    return Check("no request without an HTTP answer", str(len(errors)), not errors)


def _only_503(answers: list[Answer], codes: set[str], what: str) -> Check:
    other = [
        a
        for a in answers
        if a.status is not None and a.status >= 500 and (a.status != 503 or a.code not in codes)
    ]
    shown = ", ".join(sorted({f"{a.status} {a.code}" for a in other})[:3])
    return Check(f"5xx: only 503 {what}", shown or "yes", not other)


async def _until(predicate: Callable[[], Awaitable[bool]], within: float) -> float | None:
    """Seconds until `predicate` holds, or None if it did not within `within`."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


def _first_write_after(load: Load, moment: float) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(a.status == 201 and a.started >= moment for a in load.answers)

    return check


async def postgres_outage(stack: Stack, options: Options, *, frozen: bool = False) -> Report:
    """PostgreSQL stopped under load and started again (or, `frozen`, every process of it
    paused with SIGSTOP and resumed: a server that answers nothing); the service is left
    running."""
    name = "postgres-frozen" if frozen else "postgres"
    env = stack.env()
    connect, pool, command = (
        float(env[f"TASKAPP_DATABASE_{setting}_TIMEOUT"])
        for setting in ("CONNECT", "POOL", "COMMAND")
    )
    # A stopped server refuses at once: a request waits at most for a connection from the
    # pool, then for a new one. A frozen one also holds each statement until the command
    # timeout.
    bound, limits = (
        (pool + connect + command, "pool + connect + command") if frozen else
        (pool + connect, "pool + connect")
    )  # fmt: skip
    instance = Instance(options.work / name, env)
    await asyncio.to_thread(instance.start)
    assert instance.process is not None
    pid = instance.process.pid
    load = new_load(stack, instance.base_url, options)
    db_up: list[float | None] = []
    window: list[float] = []
    recovery: list[float | None] = []

    async def fault() -> None:
        await asyncio.sleep(options.duration / 3)
        window.append(time.monotonic())
        await asyncio.to_thread(stack.postgres.freeze if frozen else stack.postgres.stop)
        # Frozen longer than the command timeout, so statements sent to it time out.
        ends = time.monotonic() + (max(options.outage, command + 1) if frozen else options.outage)
        while time.monotonic() < ends:
            db_up.append(await stack.db_up(instance.base_url))
            await asyncio.sleep(0.3)
        await asyncio.to_thread(stack.postgres.thaw if frozen else stack.postgres.start)
        window.append(time.monotonic())
        recovery.append(await _until(_first_write_after(load, window[1]), 30))
        up_again = await _until(lambda: _is(stack.db_up(instance.base_url), 1.0), 15)
        db_up.append(1.0 if up_again is not None else 0.0)
        await asyncio.sleep(max(0.5, options.duration / 3))

    try:
        await under_load(load, fault)
    finally:
        alive = instance.process.poll() is None
        instance.kill()
    during = [a for a in load.answers if window[0] <= a.started < window[1]]
    unavailable = [a for a in load.answers if a.status == 503]
    longest = max((a.elapsed for a in unavailable), default=0.0)
    after = [a for a in load.answers if a.started >= window[1] + (recovery[0] or 0)]
    checks = [
        Check("503s while PostgreSQL was down", str(len(unavailable)), bool(unavailable)),
        _only_503(load.answers, DATABASE_OUTAGES, "from the database"),
        Check(
            f"longest 503 ≤ {limits} timeouts ({bound:.0f} s)",
            f"{longest:.2f} s",
            longest <= bound,
        ),
        _no_transport_errors(load.answers),
        Check(
            "db_up 0 while down, then 1",
            " ".join("-" if v is None else f"{v:.0f}" for v in db_up[:3] + db_up[-1:]),
            0.0 in db_up and db_up[-1] == 1.0,
        ),
        took("first 201 after the restart (within 30 s)", recovery[0]),
        Check(
            "after recovery: 2xx only",
            f"{sum(1 for a in after if a.status and a.status < 300)}/{len(after)}",
            bool(after) and all(a.status and a.status < 300 for a in after),
        ),
        Check("same server process throughout (no restart)", f"pid {pid}", alive),
        Check("requests during the outage", str(len(during)), bool(during)),
        *log_checks(instance),
    ]
    return await make_report(name, stack, load, checks)


async def _is(value: Awaitable[float | None], expected: float) -> bool:
    return await value == expected


def log_checks(*instances: Instance) -> list[Check]:
    problems = [line for i in instances for line in i.log_problems()]
    return [
        Check(
            "no traceback in the server log", problems[0][:80] if problems else "none", not problems
        )
    ]


async def redis_outage(stack: Stack, options: Options, *, fail_closed: bool = False) -> Report:
    """Redis (cache, rate limits, broker) stopped under load and started again."""
    env = stack.env(TASKAPP_RATE_LIMIT_FAIL_CLOSED=str(fail_closed).lower())
    instance = Instance(options.work / ("redis-closed" if fail_closed else "redis"), env)
    await asyncio.to_thread(instance.start)
    load = new_load(stack, instance.base_url, options)
    window: list[float] = []
    ready: list[int] = []
    recovery: list[float | None] = []

    async def readyz() -> int:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(f"{instance.base_url}/readyz")).status_code

    async def fault() -> None:
        await asyncio.sleep(options.duration / 3)
        await asyncio.to_thread(stack.redis.stop)
        # The outage is from the moment the server is gone to the moment it is started
        # again: a request sent while it was being stopped, or once it answers again, may
        # rightly be served.
        window.append(time.monotonic())
        await asyncio.sleep(options.outage / 2)
        ready.append(await readyz())
        await asyncio.sleep(options.outage / 2)
        window.append(time.monotonic())
        await asyncio.to_thread(stack.redis.start)

        async def ready_again() -> bool:
            return await readyz() == 200

        recovery.append(await _until(ready_again, 15))
        await asyncio.sleep(max(0.5, options.duration / 3))

    try:
        await under_load(load, fault)
    finally:
        instance.kill()
    during = [a for a in load.answers if window[0] <= a.started < window[1]]
    served = [a for a in during if a.status is not None and a.status < 300]
    writes = [a for a in served if a.method == "POST"]
    checks = [
        _no_transport_errors(load.answers),
        Check("/readyz 503 while Redis was down", str(ready[0]), ready[0] == 503),
        took("/readyz 200 again after the restart (within 15 s)", recovery[0]),
        *log_checks(instance),
    ]
    if fail_closed:
        checks += [
            _only_503(
                load.answers,
                {RateLimiterUnavailableError.code},
                f"'{RateLimiterUnavailableError.code}'",
            ),
            Check(
                "requests during the outage refused (fail closed)",
                f"{len(served)} 2xx of {len(during)}",
                bool(during) and not served,
            ),
        ]
    else:
        longest = max((a.elapsed for a in during), default=0.0)
        checks += [
            Check(
                "no 5xx (cache bypassed, rate limit fails open)",
                str(sum(1 for a in load.answers if a.status and a.status >= 500)),
                not any(a.status and a.status >= 500 for a in load.answers),
            ),
            Check(
                "reads and writes served while Redis was down",
                f"{len(served)}/{len(during)}, {len(writes)} writes",
                bool(writes) and len(served) == len(during),
            ),
            Check("longest request while down ≤ 2 s", f"{longest:.2f} s", longest <= 2),
        ]
    return await make_report("redis-fail-closed" if fail_closed else "redis", stack, load, checks)


async def sigterm(stack: Stack, options: Options) -> Report:
    """SIGTERM to `taskapp serve` while requests are in flight: they complete, then it exits.

    PostgreSQL is frozen for a moment first, so every client's create is inside the server
    (read, waiting on its INSERT) when the signal comes; the database thaws after it."""
    instance = Instance(options.work / "sigterm", stack.env())
    await asyncio.to_thread(instance.start)
    load = new_load(stack, instance.base_url, options, write_share=1.0)
    signalled: list[float] = []
    exit_codes: list[int | None] = []

    async def fault() -> None:
        await asyncio.sleep(options.duration / 2)
        await asyncio.to_thread(stack.postgres.freeze)
        try:
            await asyncio.sleep(0.7)
            signalled.append(time.monotonic())
            instance.terminate()
            load.stop()  # no request starts after the signal
            await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(stack.postgres.thaw)
        try:
            exit_codes.append(await asyncio.to_thread(instance.wait, 40))
        except subprocess.TimeoutExpired:
            exit_codes.append(None)

    try:
        await under_load(load, fault)
    finally:
        instance.kill()
    moment = signalled[0]
    in_flight = [a for a in load.answers if a.started < moment < a.started + a.elapsed]
    completed = [a for a in in_flight if a.status == 201]
    checks = [
        Check(
            "creates in flight at SIGTERM answered 201",
            f"{len(completed)}/{len(in_flight)}",
            bool(in_flight) and len(completed) == len(in_flight),
        ),
        _no_transport_errors(load.answers),
        Check("exit code after SIGTERM", str(exit_codes[0]), exit_codes[0] == 0),
        *log_checks(instance),
    ]
    return await make_report("sigterm", stack, load, checks)


async def rolling_restart(stack: Stack, options: Options, *, drain: bool = True) -> Report:
    """Two instances behind nginx restarted one after the other under load. With `drain`,
    each is taken out of nginx's upstreams (a graceful reload) before its SIGTERM and put
    back once healthy again; without, nginx finds out from refused connections."""
    env = stack.env()
    a = Instance(options.work / "rolling-a", env, workers=1)
    b = Instance(options.work / "rolling-b", env, workers=1)
    await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
    nginx = Nginx(options.work / "nginx", [a.port, b.port])
    # A new connection per request: a keep-alive connection that nginx closes on a reload
    # could race with the next request on it, a client-side matter this run does not test.
    load = new_load(stack, nginx.base_url, options, keepalive=False)
    exit_codes: list[int] = []

    async def fault() -> None:
        await asyncio.sleep(options.duration / 3)
        for instance, other in ((a, b), (b, a)):
            if drain:
                await nginx.route([other.port])
            instance.terminate()
            exit_codes.append(await asyncio.to_thread(instance.wait, 40))
            await asyncio.to_thread(instance.start)
            if drain:
                await nginx.route([a.port, b.port])
            await asyncio.sleep(max(0.5, options.duration / 6))

    try:
        await under_load(load, fault)
    finally:
        nginx.stop()
        a.kill()
        b.kill()
    tally = Tally.of(load.answers)
    checks = [
        Check(
            "every request 2xx",
            f"{tally.count(200, 300)}/{tally.sent}",
            tally.count(200, 300) == tally.sent,
        ),
        # With one worker uvicorn raises the SIGTERM again once its graceful shutdown is
        # done, so the process ends by that signal (-15), as process managers expect.
        Check(
            "both instances ended by SIGTERM (0 or -15)",
            " ".join(map(str, exit_codes)),
            len(exit_codes) == 2 and set(exit_codes) <= {0, -signal.SIGTERM},
        ),
        *log_checks(a, b),
    ]
    return await make_report("rolling" if drain else "rolling-no-drain", stack, load, checks)
