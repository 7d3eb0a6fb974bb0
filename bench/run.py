"""`make bench`: seed a realistic data set, serve it as production does, load it with wrk.

Prints one table (req/s, p50, p90, p99, errors, share of the ceiling) and the machine it ran
on, and saves the same as JSON under bench/results/. See README, "Performance".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import redis

from bench.plans import Plan, explain_scenarios
from bench.seed import Dataset, seed
from taskapp.db import upgrade_database
from tests.fixtures.oidc import OIDCProvider, serve_provider
from tests.fixtures.pgbouncer import PGBOUNCER, pgbouncer
from tests.fixtures.services import free_port, postgres_server, redis_server, scratch_database
from tests.fixtures.standby import streaming_pair

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "wrk" / "taskapp.lua"
RESULTS = ROOT / "bench" / "results"
PAGE_SIZE = 10


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    mode: str  # the wrk script's scenario
    title: str
    target: float | None  # minimum share of the ceiling's req/s


# A thread's users miss a given worker in all passes with probability 2^-passes (2 workers).
TOKEN_PASSES = 5

SCENARIOS = [
    Scenario(7, "ceiling", "ceiling", "fixed body, same token check", None),
    Scenario(1, "hot", "hot", "GET /tasks page 1, one owner (cache hot)", 0.60),
    Scenario(2, "list", "list", "GET /tasks, many owners, random pages", 0.35),
    Scenario(3, "get", "get", "GET /tasks/{id}, many owners", 0.35),
    Scenario(4, "create", "create", "POST /tasks, many owners", 0.20),
    Scenario(5, "patch", "patch", "PATCH /tasks/{id}, many owners", 0.20),
    Scenario(6, "mixed", "mixed", "80% reads / 20% writes, many owners", None),
]


@dataclass
class Result:
    scenario: int
    name: str
    title: str
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_kinds: dict[str, int]
    cache_hit_ratio: float | None
    ceiling_share: float | None = None
    target: float | None = None
    # Database reads the read replica answered (--topology standby).
    replica_reads: int = 0

    @property
    def meets_target(self) -> bool | None:
        if self.target is None or self.ceiling_share is None:
            return None
        return self.ceiling_share >= self.target and self.errors == 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="tasks to seed")
    parser.add_argument("--owners", type=int, help="owners (default rows / 100)")
    parser.add_argument(
        "--users", type=int, default=10_000, help="owners given tokens (at most all of them)"
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per scenario")
    parser.add_argument("--warmup", type=int, default=5, help="seconds before each")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, help="wrk threads (default: one per connection, see taskapp.lua)"
    )
    parser.add_argument("--workers", type=int, default=2, help="taskapp serve --workers")
    parser.add_argument("--log-level", default="info", help="TASKAPP_LOG_LEVEL of the server")
    parser.add_argument(
        "--scenarios", default="7,1,2,3,4,5,6", help="comma-separated numbers, in run order"
    )
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server environment (to compare settings)")  # fmt: skip
    parser.add_argument("--label", default="", help="a word for the result file name")
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="direct",
        help="direct: the local PostgreSQL; pgbouncer: through PgBouncer in transaction mode; "
        "standby: a private primary whose streaming standby serves the reads; primary: the "
        "same private primary alone (the baseline of standby)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 100k rows, 5 s per scenario"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.users, args.duration, args.warmup = 100_000, 1000, 5, 1
    args.owners = args.owners or max(100, args.rows // 100)
    args.threads = args.threads or args.connections
    return args


def _users_file(
    path: Path, provider: OIDCProvider, dataset: Dataset, count: int
) -> tuple[str, int]:
    """Tokens of the hot owner and a uniform sample of the others (every owner when `count`
    covers them all): heavy owners take their share of the traffic, no more."""
    rng = random.Random(2)  # a reproducible sample, not secrecy  # nosec B311
    hot = next(
        o for o, size in zip(dataset.owners, dataset.sizes, strict=True) if 50 <= size <= 500
    )
    rest = [o for o in dataset.owners if o != hot]
    chosen = [hot, *rng.sample(rest, min(len(rest), max(0, count - 1)))]
    sizes = dict(zip(dataset.owners, dataset.sizes, strict=True))
    expires = int(time.time()) + 12 * 3600
    with path.open("w") as out:
        for owner in chosen:
            token = provider.token(owner, exp=expires, email=f"{owner[-12:]}@bench.example")
            pages = max(1, -(-sizes[owner] // PAGE_SIZE))
            out.write(f"{token}\t{pages}\t{','.join(dataset.sample_ids[owner])}\n")
    return hot, len(chosen)


def _metric_sum(text: str, name: str, label: str) -> float:
    pattern = re.compile(rf"^{name}(?:_total)?\{{[^}}]*{label}[^}}]*\}} ([0-9.e+-]+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


class Server:
    """`python -m bench.server` (= `taskapp serve` + the ceiling route) in production mode."""

    def __init__(self, env: dict[str, str], workers: int, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        self.ceiling_bytes = 64
        command = [sys.executable, "-m", "bench.server", "127.0.0.1", str(self.port), str(workers)]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, token: str, expected_total: int) -> bytes:
        deadline = time.monotonic() + 90
        url = f"{self.base}/tasks?page=1&page_size={PAGE_SIZE}"
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: the server exited; see {self.log}")
            try:
                response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
                if response.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the server did not become ready; see {self.log}")
            time.sleep(0.25)
        if response.json()["total"] != expected_total:
            raise SystemExit(f"bench: unexpected first page: {response.text[:300]}")
        return response.content

    def counts(self) -> tuple[float, float, float]:
        """Cache hits, cache lookups, and database reads answered by a read replica."""
        token = self.env["TASKAPP_METRICS_TOKEN"]
        text = httpx.get(
            f"{self.base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).text
        hits = _metric_sum(text, "taskapp_cache_requests", 'result="hit"')
        lookups = hits + _metric_sum(text, "taskapp_cache_requests", 'result="miss"')
        return hits, lookups, _metric_sum(text, "db_reads", 'server="replica"')

    def problems(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if re.search(r"ERROR|CRITICAL|Traceback|WARNING", line)]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def run_wrk(
    args: argparse.Namespace,
    server: Server,
    mode: str,
    users: Path,
    seconds: float,
    rate: float | None = None,
) -> Any:
    """One wrk run of `seconds`; closed loop, or paced at `rate` req/s (all threads)."""
    command = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(LUA), server.base, "--", mode, str(users), str(server.ceiling_bytes),
        str(args.threads), f"{rate:g}" if rate else "0",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in reversed(output.splitlines()) if line.startswith("{"))
    return json.loads(line)


def _run_scenario(
    args: argparse.Namespace, server: Server, scenario: Scenario, users: Path
) -> Result:
    if args.warmup:
        run_wrk(args, server, scenario.mode, users, args.warmup)
    hits_before, lookups_before, replica_before = server.counts()
    raw = run_wrk(args, server, scenario.mode, users, args.duration)
    hits_after, lookups_after, replica_after = server.counts()
    lookups = lookups_after - lookups_before
    return Result(
        scenario=scenario.number,
        name=scenario.name,
        title=scenario.title,
        requests=raw["requests"],
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors=sum(raw["errors"].values()),
        error_kinds={k: v for k, v in raw["errors"].items() if v},
        cache_hit_ratio=(hits_after - hits_before) / lookups if lookups else None,
        target=scenario.target,
        replica_reads=int(replica_after - replica_before),
    )


def machine_facts(database_url: str, redis_url: str) -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    with psycopg.connect(database_url) as connection:
        postgres = connection.execute("SHOW server_version").fetchone()
    client = redis.Redis.from_url(redis_url)
    try:
        redis_version = client.info("server")["redis_version"]
    finally:
        client.close()
    # wrk and git as the PATH finds them, like the load itself.
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()  # nosec
    packages = [
        "taskapp",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "sqlalchemy",
        "asyncpg",
        "redis",
        "hiredis",
        "pyjwt",
        "cryptography",
        "pydantic",
        "orjson",
    ]
    versions = {}
    for name in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    commit = subprocess.run(  # nosec
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": postgres[0] if postgres else None,
        "redis": redis_version,
        "wrk": wrk_version[1] if len(wrk_version) > 1 else None,
        "commit": commit or None,
        "packages": versions,
    }


def _table(results: list[Result]) -> str:
    lines = [
        f"{'#':>2} {'scenario':<42} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'ceiling':>8} {'target':>7} {'cache hits':>10}"
    ]
    for r in results:
        share = f"{r.ceiling_share:.0%}" if r.ceiling_share is not None else "-"
        target = "-" if r.target is None else f"{'≥' if r.meets_target else '<'}{r.target:.0%}"
        hits = f"{r.cache_hit_ratio:.0%}" if r.cache_hit_ratio is not None else "-"
        lines.append(
            f"{r.scenario:>2} {r.title:<42} {r.rps:>8.0f} {r.p50_ms:>7.1f} {r.p90_ms:>7.1f} "
            f"{r.p99_ms:>7.1f} {r.errors:>6} {share:>8} {target:>7} {hits:>10}"
        )
    return "\n".join(lines)


TOPOLOGIES = ("direct", "pgbouncer", "standby", "primary")


@contextlib.contextmanager
def _services(work: Path) -> Iterator[tuple[str, str]]:
    """A scratch database (migrated, empty) and a Redis URL; local servers or embedded ones."""
    with (
        postgres_server(work) as admin_url,
        redis_server(work) as redis_url,
        scratch_database(admin_url, prefix="taskapp_bench") as database_url,
    ):
        yield database_url, redis_url


@dataclass
class Prepared:
    """A migrated scratch database seeded with a data set, and the Redis beside it."""

    database_url: str  # psycopg form
    async_url: str  # the service's form
    redis_url: str
    dataset: Dataset
    seed_seconds: float
    # How the service reaches the data (see `--topology`): its TASKAPP_DATABASE_* settings.
    server_env: dict[str, str]


def _asyncpg(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def _topology(
    stack: contextlib.ExitStack, work: Path, topology: str
) -> tuple[str, str, Callable[[str], dict[str, str]]]:
    """The database to seed, the Redis URL, and the service's database settings for it."""
    if topology in {"direct", "pgbouncer"}:
        database_url, redis_url = stack.enter_context(_services(work))
        if topology == "direct":
            return database_url, redis_url, lambda url: {"TASKAPP_DATABASE_URL": _asyncpg(url)}
        if not Path(PGBOUNCER).exists():
            sys.exit("bench: PgBouncer not found (apt-get install pgbouncer)")
        # As many server connections as the two workers' pools could use.
        bouncer = stack.enter_context(pgbouncer(database_url, pool_size=40))
        return (
            database_url,
            redis_url,
            lambda _: {
                "TASKAPP_DATABASE_URL": _asyncpg(bouncer.url),
                "TASKAPP_DATABASE_PGBOUNCER": "true",
            },
        )
    # A private primary with a streaming standby (crash-safe, like the local server).
    pair = stack.enter_context(streaming_pair(durable=True))
    redis_url = stack.enter_context(redis_server(work))
    database_url = stack.enter_context(scratch_database(pair.primary.url, prefix="taskapp_bench"))
    name = urlsplit(database_url).path

    def settings(url: str) -> dict[str, str]:
        env = {"TASKAPP_DATABASE_URL": _asyncpg(url)}
        if topology == "standby":
            env["TASKAPP_DATABASE_REPLICA_URL"] = _asyncpg(
                pair.standby.url.rsplit("/", 1)[0] + name
            )
        return env

    return database_url, redis_url, settings


def prepare_data(stack: contextlib.ExitStack, work: Path, args: argparse.Namespace) -> Prepared:
    """Services (local or embedded, released by `stack`), migrated and seeded per `args`."""
    database_url, redis_url, server_env = _topology(stack, work, args.topology)
    async_url = _asyncpg(database_url)
    upgrade_database(async_url)
    started = time.monotonic()
    dataset = seed(database_url, rows=args.rows, owners=args.owners)
    seeded = time.monotonic() - started
    print(f"seeded {dataset.rows:,} tasks of {len(dataset.owners):,} owners in {seeded:.1f} s")
    return Prepared(database_url, async_url, redis_url, dataset, seeded, server_env(database_url))


@dataclass
class Service:
    """The service under load, its users' tokens and its settings."""

    server: Server
    env: dict[str, str]
    users: Path  # the wrk script's users file
    hot: str  # the owner of scenario 1
    minted: int
    page: bytes  # page 1 of the hot owner


def start_service(
    stack: contextlib.ExitStack,
    work: Path,
    args: argparse.Namespace,
    data: Prepared,
    label: str = "bench",
) -> Service:
    """A local OIDC provider, tokens for `args.users` owners, and the server in production
    mode with `args.workers` workers, ready; all stopped (keys forgotten) by `stack`."""
    provider = stack.enter_context(contextlib.contextmanager(serve_provider)())
    users = work / "users.tsv"
    started = time.monotonic()
    hot, minted = _users_file(users, provider, data.dataset, args.users)
    print(f"\nminted tokens for {minted:,} owners in {time.monotonic() - started:.1f} s")

    prefix = f"{label}-{uuid.uuid4().hex[:12]}:"
    env = {
        "TASKAPP_ENV": "production",
        "TASKAPP_LOG_LEVEL": args.log_level,
        **data.server_env,
        "TASKAPP_REDIS_URL": data.redis_url,
        "TASKAPP_REDIS_KEY_PREFIX": prefix,
        "TASKAPP_OIDC_ISSUER": provider.issuer,
        "TASKAPP_METRICS_TOKEN": secrets.token_urlsafe(32),
        "TASKAPP_NOTIFICATIONS_QUEUE": f"{prefix}notifications",
        # Far above the load, so the limiter is exercised but never decides.
        "TASKAPP_RATE_LIMIT": "1000000/second",
    }
    env.update(item.split("=", 1) for item in args.env)
    server = Server(env, args.workers, work / "server.log")
    stack.callback(_forget_keys, data.redis_url, prefix)
    stack.callback(server.stop)
    sizes = dict(zip(data.dataset.owners, data.dataset.sizes, strict=True))
    page = server.wait_ready(provider.token(hot), sizes[hot])
    server.ceiling_bytes = len(page)
    return Service(server, env, users, hot, minted, page)


def present_tokens(args: argparse.Namespace, service: Service) -> None:
    """Every token to every worker, as clients with live sessions will have done: a token's
    first request verifies its signature, later ones reuse the claims. Each wrk run opens new
    connections, which the kernel spreads over the workers at random, so a few passes reach
    every worker with every thread's users."""
    for _ in range(TOKEN_PASSES):
        run_wrk(
            args, service.server, "tokens", service.users, max(1, math.ceil(service.minted / 2000))
        )


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if shutil.which("wrk") is None:
        sys.exit("bench: wrk not found (apt-get install wrk)")
    chosen = [int(n) for n in args.scenarios.split(",")]
    scenarios = [next(s for s in SCENARIOS if s.number == n) for n in chosen]
    work = Path(tempfile.mkdtemp(prefix="taskapp-bench-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        data = prepare_data(stack, work, args)
        database_url, redis_url, dataset = data.database_url, data.redis_url, data.dataset

        heavy = dataset.owners[0]
        plans: list[Plan] = asyncio.run(
            explain_scenarios(
                data.async_url,
                owner=heavy,
                deep_offset=(dataset.sizes[0] // PAGE_SIZE - 1) * PAGE_SIZE,
                task_id=dataset.sample_ids[heavy][0],
            )
        )
        print(f"\nQuery plans for owner {heavy} ({dataset.sizes[0]:,} tasks), deepest page:")
        for plan in plans:
            print(f"  {plan.scenario:<18} {'one partition, index' if plan.ok else 'CHECK FAILED'}"
                  f"  {plan.summary()}")  # fmt: skip

        service = start_service(stack, work, args, data)
        server, env = service.server, service.env
        print(
            f"\n{args.workers} workers; wrk -t{args.threads} -c{args.connections}, "
            f"{args.warmup} s warm-up + {args.duration} s per scenario; "
            f"the ceiling answers {len(service.page)} bytes like page 1 of the hot owner\n"
        )
        present_tokens(args, service)
        users = service.users
        results: list[Result] = []
        for scenario in scenarios:
            result = _run_scenario(args, server, scenario, users)
            results.append(result)
            print(
                f"  {scenario.number} {scenario.name:<8} {result.rps:8.0f} req/s  "
                f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}"
                + (f"  replica reads {result.replica_reads:,}" if result.replica_reads else ""),
                flush=True,
            )
        ceiling = next((r for r in results if r.scenario == 7), None)
        for result in results:
            if ceiling is not None and result is not ceiling:
                result.ceiling_share = result.rps / ceiling.rps
        problems = server.problems()
        server.stop()

        machine = machine_facts(database_url, redis_url)
        print()
        print(_table(results))
        print(
            f"\n{dataset.rows:,} tasks, {len(dataset.owners):,} owners; {machine['cpus']} CPUs "
            f"({machine['cpu']}) shared by wrk, taskapp, PostgreSQL {machine['postgresql']} "
            f"and Redis {machine['redis']}; Python {machine['python']}; {machine['date']}"
        )
        if problems:
            print(f"\nserver log: {len(problems)} warning/error lines, first: {problems[0][:300]}")

        RESULTS.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        label = f"-{args.label}" if args.label else ""
        out = RESULTS / f"{stamp}-{dataset.rows}rows-c{args.connections}{label}.json"
        document = {
            "machine": machine,
            "settings": {
                k: v for k, v in vars(args).items() if k not in {"env"}
            } | {"server_env": shareable_env(env)},
            "dataset": {"rows": dataset.rows, "owners": len(dataset.owners),
                        "largest_owner": max(dataset.sizes),
                        "seed_seconds": round(data.seed_seconds, 1)},
            "plans": [asdict(plan) | {"ok": plan.ok} for plan in plans],
            "results": [asdict(r) | {"meets_target": r.meets_target} for r in results],
            "server_log_problems": problems[:20],
        }  # fmt: skip
        out.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nsaved {out.relative_to(ROOT)}")

    failed = [r.name for r in results if r.errors] + [p.scenario for p in plans if not p.ok]
    if problems:
        failed.append("server log")
    if failed:
        print(f"bench: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def shareable_env(env: dict[str, str]) -> dict[str, str]:
    """The server settings fit for a results file: no token, no password in a URL."""
    shown = {}
    for name, value in env.items():
        if "TOKEN" in name or "PASSWORD" in name or "SECRET" in name:
            continue
        if "://" in value:
            parts = urlsplit(value)
            if parts.password:
                host = parts.netloc.rsplit("@", 1)[1]
                value = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
        shown[name] = value
    return shown


def _forget_keys(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"*{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
