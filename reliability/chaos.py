"""`make chaos`: faults under load, with real processes stopped and started on loopback.

Scenarios (in this order unless `--scenarios` says otherwise):
  postgres           PostgreSQL stopped during load, then started: fast 503s, db_up 0 then 1,
                     recovery without restarting the service
  postgres-frozen    PostgreSQL paused (SIGSTOP: accepts, answers nothing), then resumed:
                     503s within the timeouts, recovery
  redis              Redis stopped during load, then started: reads and writes still served
                     (cache bypassed, rate limit fails open)
  redis-fail-closed  the same with TASKAPP_RATE_LIMIT_FAIL_CLOSED=true: 503s, then recovery
  sigterm            SIGTERM to `taskapp serve` with requests in flight: they complete
  rolling            two instances behind nginx restarted one by one: no request dropped
  mail               broker, worker and mail server faults while tasks are created: every
                     task answered 201 mailed exactly once
  rolling-no-drain   the same as rolling without taking an instance out of nginx first (not
                     in the default set: what a restart costs when the proxy is not told)

Every scenario prints requests sent, answers by status, requests without an HTTP answer,
the longest request, writes answered 201, writes lost (201 but not in the database), creates
answered with an error yet stored (whose answer must have said the outcome was unknown),
and its own checks. The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from reliability.chaos_mail import mail_faults
from reliability.chaos_scenarios import (
    Options,
    Report,
    postgres_outage,
    redis_outage,
    rolling_restart,
    sigterm,
)
from reliability.chaos_stack import Stack, stack

Scenario = Callable[[Stack, Options], Awaitable[Report]]

SCENARIOS: dict[str, Scenario] = {
    "postgres": postgres_outage,
    "postgres-frozen": lambda s, o: postgres_outage(s, o, frozen=True),
    "redis": redis_outage,
    "redis-fail-closed": lambda s, o: redis_outage(s, o, fail_closed=True),
    "sigterm": sigterm,
    "rolling": rolling_restart,
    "rolling-no-drain": lambda s, o: rolling_restart(s, o, drain=False),
    "mail": mail_faults,
}
DEFAULT = "postgres,postgres-frozen,redis,redis-fail-closed,sigterm,rolling,mail"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reliability.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--duration", type=float, default=12, help="seconds of load per scenario")
    parser.add_argument("--outage", type=float, default=4, help="seconds a server stays down")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at once")
    parser.add_argument(
        "--think", type=float, default=0.0, help="seconds each client waits between requests"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def table(report: Report) -> str:
    t = report.tally
    statuses = ", ".join(f"{status}: {n}" for status, n in sorted(t.by_status.items()))
    errors = ", ".join(f"{kind}: {n}" for kind, n in sorted(t.errors.items())) or "0"
    rows = [
        ("requests sent", str(t.sent)),
        ("2xx", str(t.count(200, 300))),
        ("4xx", str(t.count(400, 500))),
        ("5xx", str(t.count(500, 600))),
        ("by status", statuses),
        ("other errors (no HTTP answer)", errors),
        ("longest request", f"{t.longest:.2f} s"),
        ("writes answered 201", str(report.acknowledged)),
        ("lost writes (201, not in the database)", str(report.lost)),
        ("creates answered otherwise yet stored", str(report.stored_anyway)),
    ]
    rows += [(f"{'ok  ' if c.ok else 'FAIL'} {c.name}", c.value) for c in report.checks]
    width = max(len(name) for name, _ in rows)
    head = f"== {report.name}: {'ok' if report.ok else 'FAILED'}"
    return "\n".join([head, *(f"  {name:<{width}}  {value}" for name, value in rows)])


async def _run(args: argparse.Namespace, services: Stack, work: Path) -> list[Report]:
    options = Options(args.duration, args.outage, args.concurrency, work, args.think)
    reports = []
    for name in args.scenarios.split(","):
        print(f"-- {name}: {args.duration:g} s of load, {args.concurrency} clients", flush=True)
        report = await SCENARIOS[name](services, options)
        print(table(report), flush=True)
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    work = Path(tempfile.mkdtemp(prefix="taskapp-chaos-"))
    with contextlib.ExitStack() as exits:
        if args.keep:
            print(f"work directory (logs): {work}")
        else:
            exits.callback(shutil.rmtree, work, ignore_errors=True)
        services = exits.enter_context(stack(work))
        reports = asyncio.run(_run(args, services, work))
    failed = [r.name for r in reports if not r.ok]
    if failed:
        print(f"chaos: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"chaos: all {len(reports)} scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
