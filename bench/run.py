"""`make bench`: seed a realistic data set, serve it as production does, load it with wrk, and
measure every scenario against an independent ceiling.

The ceiling (bench/ceiling/app.py) is a bare Starlette app outside taskapp, in a virtualenv of
its own, that verifies the same token on every request and answers the bytes of taskapp's own
page 1: the least a correct service must do for GET /tasks on this machine. It is loaded
first and last; the mean of the two is the 1.00 every scenario is a share of.

Prints one table (req/s, p50, p90, p99, errors, share of the ceiling) and the machine it ran
on, and saves the same as JSON under bench/results/. See docs/performance.md.
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import psycopg
import redis

from bench.plans import Plan, explain_scenarios, explain_shared
from bench.seed import BUSY_PROJECTS, Dataset, SharedDataset, seed, seed_shared
from taskapp.database.migrations import upgrade_database
from testing.oidc import AUDIENCE, OIDCProvider, serve_provider
from testing.pgbouncer import PGBOUNCER, pgbouncer
from testing.services import (
    free_port,
    postgres_server,
    redis_server,
    scratch_database,
    with_database,
)
from testing.standby import streaming_pair

ROOT = Path(__file__).resolve().parent.parent
# The shared data set's people, and how many of them are busy (in 20 shared projects each).
SHARED_USERS = 10_000
SHARED_BUSY = 500
LUA = ROOT / "bench" / "wrk" / "taskapp.lua"
RESULTS = ROOT / "bench" / "results"
PAGE_SIZE = 10


@dataclass(frozen=True)
class Scenario:
    number: int
    name: str
    mode: str  # the wrk script's scenario
    title: str


# A thread's users miss a given worker in all passes with probability 2^-passes (2 workers).
TOKEN_PASSES = 5
# A pass presents each thread's users in turn; at this rate or more, all of them.
TOKENS_PER_SECOND = 500

# The independent ceiling's runs: the first and the last of every benchmark.
CEILING = Scenario(0, "ceiling", "hot", "ceiling: verify the token, answer page 1")
SCENARIOS = [
    Scenario(1, "hot", "hot", "GET /tasks page 1, one owner (cache hot)"),
    Scenario(2, "list", "list", "GET /tasks, many owners, random pages 1-10"),
    Scenario(3, "get", "get", "GET /tasks/{id}, many owners"),
    Scenario(4, "create", "create", "POST /tasks, many owners"),
    Scenario(5, "patch", "patch", "PATCH /tasks/{id}, many owners"),
    Scenario(6, "mixed", "mixed", "80% reads / 20% writes, many owners"),
    # On the shared data set (--dataset shared): the busy users, each in 20 shared projects.
    Scenario(7, "shared", "shared", "GET /tasks pages 1-5, member of 20 projects"),
    Scenario(8, "project", "project", "GET /tasks?project= pages 1-3, one of them"),
    Scenario(9, "assigned", "assigned", "GET /tasks?assignee=me pages 1-3"),
    # Not run by default: scenario 2 over every page, the deepest offsets included.
    Scenario(10, "deep", "deep", "GET /tasks, many owners, any page"),
]
SHARED_SCENARIOS = {7, 8, 9}


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
    # Database reads the read replica answered (--topology standby).
    replica_reads: int = 0
    # CPU time the server's processes spent per request (user + system, all workers): far
    # less moved by what else the machine does than req/s.
    cpu_ms: float | None = None


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="tasks to seed")
    parser.add_argument("--owners", type=int, help="owners (default rows / 100)")
    parser.add_argument(
        "--dataset",
        choices=("owners", "shared"),
        default="owners",
        help="owners: every task in its owner's Inbox (scenarios 1-6); shared: 10,000 users, "
        "half the tasks in shared projects of 2-50 members and a few large ones, 500 busy "
        "users each in 20 of them (scenarios 7-9)",
    )
    parser.add_argument("--projects", type=int, default=2_000, help="shared projects")
    parser.add_argument(
        "--users", type=int, default=10_000, help="owners given tokens (at most all of them)"
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--warmup", type=int, default=3, help="seconds before each")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (see taskapp.lua)")
    parser.add_argument("--workers", type=int, default=2, help="taskapp serve --workers")
    parser.add_argument("--log-level", default="info", help="TASKAPP_LOG_LEVEL of the server")
    parser.add_argument(
        "--scenarios",
        help="comma-separated numbers, in run order (the ceiling runs first and last); "
        "default 1-6, with --dataset shared 7-9; 10 (scenario 2 over every page) on request",
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
    parser.add_argument(
        "--database-tls",
        action="store_true",
        help="reach the local PostgreSQL over TLS when it offers it (Debian's does); by "
        "default the service connects over loopback without TLS, as in deploy/compose.yml",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="a second checkout (with its own .venv) to serve the same data beside this one: "
        "each scenario then alternates between the two, --pairs times, and both are reported",
    )
    parser.add_argument("--pairs", type=int, default=2, help="runs of each side (--baseline)")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if args.topology != "direct":
            parser.error("--baseline compares on the direct topology only")
        if not (args.baseline / ".venv" / "bin" / "python").exists():
            parser.error(f"{args.baseline} has no .venv (make install there)")
    if args.quick:
        args.rows, args.users, args.duration, args.warmup = 100_000, 1000, 5, 1
    shared = args.dataset == "shared"
    if args.scenarios is None:
        args.scenarios = "7,8,9" if shared else "1,2,3,4,5,6"
    chosen = {int(n) for n in args.scenarios.split(",")}
    unknown = chosen - {s.number for s in SCENARIOS}
    if unknown:
        parser.error(f"--scenarios: no scenario {', '.join(map(str, sorted(unknown)))}")
    if (chosen - SHARED_SCENARIOS) if shared else (chosen & SHARED_SCENARIOS):
        parser.error("scenarios 1-6 and 10 run on --dataset owners, 7-9 on --dataset shared")
    if shared:
        if args.baseline is not None:
            parser.error("--baseline compares on --dataset owners only")
        if args.projects < BUSY_PROJECTS:
            parser.error(f"--projects: at least {BUSY_PROJECTS} (each busy user's share)")
        args.owners = args.owners or SHARED_USERS
    args.owners = args.owners or max(100, args.rows // 100)
    return args


def _shared_users_file(
    path: Path, provider: OIDCProvider, dataset: SharedDataset
) -> tuple[str, int]:
    """Tokens of the busy users, each line with the ids of their shared projects."""
    expires = int(time.time()) + 12 * 3600
    with path.open("w") as out:
        for user, projects in dataset.busy.items():
            token = provider.token(user, exp=expires, email=f"{user[-12:]}@bench.example")
            pages = max(1, -(-dataset.visible(user) // PAGE_SIZE))
            ids = ",".join(dataset.sample_ids[user])
            out.write(f"{token}\t{pages}\t{ids}\t{','.join(str(p.id) for p in projects)}\n")
    return next(iter(dataset.busy)), len(dataset.busy)


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
    """`taskapp serve` in production mode, with its log in `log`."""

    def __init__(self, env: dict[str, str], workers: int, log: Path, checkout: Path = ROOT) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log = log
        command = [_python(checkout), "-m", "taskapp.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", str(workers)]  # fmt: skip
        self.process = _start(command, {**os.environ, **env}, log, cwd=checkout)

    def wait_ready(self, token: str, expected_total: int) -> bytes:
        """Page 1 of the owner of `token`, once the server answers it."""
        url = f"{self.base}/tasks?page=1&page_size={PAGE_SIZE}"
        response = _wait_for(self.process, url, self.log, {"Authorization": f"Bearer {token}"})
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
        _stop(self.process)


CEILING_DIR = ROOT / "bench" / "ceiling"
CEILING_VENV = ROOT / ".venv-ceiling"


def ceiling_python() -> Path:
    """The interpreter of the ceiling's virtualenv, made (or remade, when its requirements
    changed) from bench/ceiling/requirements.txt."""
    requirements = (CEILING_DIR / "requirements.txt").read_bytes()
    stamp = CEILING_VENV / ".requirements"
    python = CEILING_VENV / "bin" / "python"
    if not stamp.exists() or stamp.read_bytes() != requirements:
        print(f"bench: installing the ceiling's stack into {CEILING_VENV.name}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CEILING_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--requirement",
             str(CEILING_DIR / "requirements.txt")],
            check=True,
        )  # fmt: skip
        stamp.write_bytes(requirements)
    return python


class Ceiling:
    """The independent ceiling (bench/ceiling/app.py) under uvicorn with `workers` processes,
    uvloop and httptools, answering `body` to tokens of `provider`'s signing key."""

    def __init__(self, provider: OIDCProvider, body: bytes, workers: int, work: Path) -> None:
        key, body_file = work / "ceiling-key.pem", work / "ceiling-body.json"
        key.write_bytes(provider.public_pem())
        body_file.write_bytes(body)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = work / "ceiling.log"
        command = [str(ceiling_python()), "-m", "uvicorn", "app:app", "--app-dir",
                   str(CEILING_DIR), "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                   "--no-access-log"]  # fmt: skip
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PERF_CEILING_KEY": str(key),
            "PERF_CEILING_BODY": str(body_file),
            "PERF_CEILING_ISSUER": provider.issuer,
            "PERF_CEILING_AUDIENCE": AUDIENCE,
        }
        self.process = _start(command, env, self.log)

    def wait_ready(self, token: str, body: bytes) -> None:
        url = f"{self.base}/tasks?page=1&page_size={PAGE_SIZE}"
        response = _wait_for(self.process, url, self.log, {"Authorization": f"Bearer {token}"})
        if response.content != body:
            raise SystemExit("bench: the ceiling does not answer page 1's bytes")

    def stop(self) -> None:
        _stop(self.process)


def _python(checkout: Path) -> str:
    """The interpreter that runs `checkout`'s taskapp: this one, or that checkout's .venv."""
    return sys.executable if checkout == ROOT else str(checkout / ".venv" / "bin" / "python")


def _start(
    command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for(
    process: subprocess.Popen[bytes], url: str, log: Path, headers: dict[str, str]
) -> httpx.Response:
    """The first 200 answer of `url`; exits when the process ends or 90 s pass."""
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise SystemExit(f"bench: a server exited; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(url, headers=headers, timeout=5)
            if response.status_code == 200:
                return response
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {url} did not answer in time; see {log}")
        time.sleep(0.25)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_wrk(
    args: argparse.Namespace,
    base: str,
    mode: str,
    users: Path,
    seconds: float,
    rate: float | None = None,
) -> Any:
    """One wrk run of `seconds` against `base`; closed loop, or paced at `rate` req/s (all
    threads)."""
    command = [
        "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s", "--timeout", "5s",
        "-s", str(LUA), base, "--", mode, str(users), str(args.threads),
        f"{rate:g}" if rate else "0",
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in reversed(output.splitlines()) if line.startswith("{"))
    return json.loads(line)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and every process below it, so far."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _run_scenario(
    args: argparse.Namespace, server: Server, scenario: Scenario, users: Path
) -> Result:
    if args.warmup:
        run_wrk(args, server.base, scenario.mode, users, args.warmup)
    hits_before, lookups_before, replica_before = server.counts()
    cpu_before = cpu_seconds(server.process.pid)
    raw = run_wrk(args, server.base, scenario.mode, users, args.duration)
    cpu_after = cpu_seconds(server.process.pid)
    hits_after, lookups_after, replica_after = server.counts()
    lookups = lookups_after - lookups_before
    result = _result(scenario, raw, cpu_after - cpu_before)
    result.cache_hit_ratio = (hits_after - hits_before) / lookups if lookups else None
    result.replica_reads = int(replica_after - replica_before)
    return result


def _run_ceiling(args: argparse.Namespace, ceiling: Ceiling, users: Path) -> Result:
    if args.warmup:
        run_wrk(args, ceiling.base, CEILING.mode, users, args.warmup)
    cpu_before = cpu_seconds(ceiling.process.pid)
    raw = run_wrk(args, ceiling.base, CEILING.mode, users, args.duration)
    return _result(CEILING, raw, cpu_seconds(ceiling.process.pid) - cpu_before)


def _result(scenario: Scenario, raw: Any, cpu: float) -> Result:
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
        cache_hit_ratio=None,
        cpu_ms=cpu * 1000 / raw["requests"] if raw["requests"] else None,
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
        f"{'#':>2} {'scenario':<47} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'share':>6} {'cache hits':>10} {'CPU ms/req':>10}"
    ]
    for r in results:
        number = "-" if r.scenario == CEILING.number else str(r.scenario)
        share = f"{r.ceiling_share:.2f}" if r.ceiling_share is not None else "-"
        hits = f"{r.cache_hit_ratio:.0%}" if r.cache_hit_ratio is not None else "-"
        cpu = f"{r.cpu_ms:.3f}" if r.cpu_ms is not None else "-"
        lines.append(
            f"{number:>2} {r.title:<47} {r.rps:>8.0f} {r.p50_ms:>7.1f} {r.p90_ms:>7.1f} "
            f"{r.p99_ms:>7.1f} {r.errors:>6} {share:>6} {hits:>10} {cpu:>10}"
        )
    return "\n".join(lines)


@dataclass
class Comparison:
    """One scenario's runs on this checkout and on the baseline, alternating."""

    scenario: Scenario
    ours: list[Result] = field(default_factory=list)
    theirs: list[Result] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """This checkout's median req/s over the baseline's."""
        return median(r.rps for r in self.ours) / median(r.rps for r in self.theirs)

    @property
    def cpu_ratio(self) -> float | None:
        """This checkout's median CPU time per request over the baseline's."""
        ours = [r.cpu_ms for r in self.ours if r.cpu_ms]
        theirs = [r.cpu_ms for r in self.theirs if r.cpu_ms]
        return median(ours) / median(theirs) if ours and theirs else None

    def summary(self, yardstick: float) -> dict[str, Any]:
        cpu_ratio = self.cpu_ratio
        return {
            "scenario": self.scenario.number,
            "name": self.scenario.name,
            "rps": [round(r.rps, 1) for r in self.ours],
            "baseline_rps": [round(r.rps, 1) for r in self.theirs],
            "share": round(median(r.rps for r in self.ours) / yardstick, 3),
            "baseline_share": round(median(r.rps for r in self.theirs) / yardstick, 3),
            "ratio": round(self.ratio, 3),
            "cpu_ms": [round(r.cpu_ms, 4) if r.cpu_ms else None for r in self.ours],
            "baseline_cpu_ms": [round(r.cpu_ms, 4) if r.cpu_ms else None for r in self.theirs],
            "cpu_ratio": round(cpu_ratio, 3) if cpu_ratio is not None else None,
        }


def _comparison_table(comparisons: list[Comparison], yardstick: float) -> str:
    rows = []
    for c in comparisons:
        summary = c.summary(yardstick)
        rows.append((
            f"{c.scenario.number:>2} {c.scenario.title:<42}",
            "/".join(f"{r:.0f}" for r in summary["rps"]),
            "/".join(f"{r:.0f}" for r in summary["baseline_rps"]),
            f"{summary['share']:.2f}", f"{summary['baseline_share']:.2f}", f"{c.ratio:.2f}",
            "-" if c.cpu_ratio is None else f"{c.cpu_ratio:.2f}",
        ))  # fmt: skip
    header = (f"{'#':>2} {'scenario':<42}", "this req/s", "baseline req/s", "share",
              "baseline", "ratio", "CPU/req ratio")  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *rows]
    )  # fmt: skip


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


# The service's URL for the local server unless --database-tls: loopback without TLS, as the
# deployment's database (the postgres image offers no TLS; Debian's server does by default).
_NO_TLS = "ssl=disable"


def _service_url(url: str, tls: bool) -> str:
    url = _asyncpg(url)
    return url if tls else f"{url}{'&' if '?' in url else '?'}{_NO_TLS}"


def _topology(
    stack: contextlib.ExitStack, work: Path, topology: str, tls: bool
) -> tuple[str, str, Callable[[str], dict[str, str]]]:
    """The database to seed, the Redis URL, and the service's database settings for it."""
    if topology in {"direct", "pgbouncer"}:
        database_url, redis_url = stack.enter_context(_services(work))
        if topology == "direct":
            return (
                database_url,
                redis_url,
                lambda url: {"TASKAPP_DATABASE_URL": _service_url(url, tls)},
            )
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
    database_url, redis_url, server_env = _topology(stack, work, args.topology, args.database_tls)
    async_url = _asyncpg(database_url)
    upgrade_database(async_url)
    started = time.monotonic()
    dataset: Dataset
    if args.dataset == "shared":
        dataset = seed_shared(
            database_url,
            rows=args.rows,
            users=args.owners,
            projects=args.projects,
            busy=min(SHARED_BUSY, args.owners),
        )
    else:
        dataset = seed(database_url, rows=args.rows, owners=args.owners)
    seeded = time.monotonic() - started
    print(f"seeded {dataset.rows:,} tasks of {len(dataset.owners):,} owners in {seeded:.1f} s")
    return Prepared(database_url, async_url, redis_url, dataset, seeded, server_env(database_url))


def _page_ids(page: bytes) -> list[str]:
    return [item["id"] for item in json.loads(page)["items"]]


def prepare_baseline(
    stack: contextlib.ExitStack, work: Path, args: argparse.Namespace, data: Prepared
) -> Prepared:
    """A second scratch database on the same server for the baseline checkout: migrated by
    its own `taskapp migrate` (its schema may differ), seeded with the same data set."""
    admin_url = with_database(data.database_url, "postgres")
    database_url = stack.enter_context(scratch_database(admin_url, prefix="taskapp_baseline"))
    env = {**os.environ, "TASKAPP_DATABASE_URL": _asyncpg(database_url)}
    subprocess.run(
        [_python(args.baseline), "-m", "taskapp.cli", "migrate"], env=env, cwd=args.baseline,
        check=True, capture_output=True,
    )  # fmt: skip
    started = time.monotonic()
    dataset = seed(database_url, rows=args.rows, owners=args.owners)
    if (dataset.owners, dataset.sizes) != (data.dataset.owners, data.dataset.sizes):
        sys.exit("bench: the baseline's data set differs")
    seeded = time.monotonic() - started
    print(f"seeded the baseline's copy in {seeded:.1f} s")
    return Prepared(
        database_url,
        _asyncpg(database_url),
        data.redis_url,
        dataset,
        seeded,
        {"TASKAPP_DATABASE_URL": _service_url(database_url, args.database_tls)},
    )


@dataclass
class Service:
    """The service under load, its users' tokens and its settings."""

    server: Server
    env: dict[str, str]
    users: Path  # the wrk script's users file
    hot: str  # the owner of scenario 1
    minted: int
    page: bytes  # page 1 of the hot owner
    provider: OIDCProvider


def start_service(
    stack: contextlib.ExitStack,
    work: Path,
    args: argparse.Namespace,
    data: Prepared,
    label: str = "bench",
    *,
    beside: Service | None = None,
    checkout: Path = ROOT,
) -> Service:
    """A local OIDC provider, tokens for `args.users` owners, and `checkout`'s server in
    production mode with `args.workers` workers, ready; all stopped (keys forgotten) by
    `stack`. `beside`: a service whose provider and tokens this one shares."""
    if beside is None:
        provider = stack.enter_context(contextlib.contextmanager(serve_provider)())
        users = work / "users.tsv"
        started = time.monotonic()
        if isinstance(data.dataset, SharedDataset):
            hot, minted = _shared_users_file(users, provider, data.dataset)
        else:
            hot, minted = _users_file(users, provider, data.dataset, args.users)
        print(f"\nminted tokens for {minted:,} owners in {time.monotonic() - started:.1f} s")
    else:
        provider, users, hot, minted = beside.provider, beside.users, beside.hot, beside.minted

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
    server = Server(env, args.workers, work / f"{label}.log", checkout)
    stack.callback(_forget_keys, data.redis_url, prefix)
    stack.callback(server.stop)
    if isinstance(data.dataset, SharedDataset):
        expected = data.dataset.visible(hot)
    else:
        expected = dict(zip(data.dataset.owners, data.dataset.sizes, strict=True))[hot]
    page = server.wait_ready(provider.token(hot), expected)
    return Service(server, env, users, hot, minted, page, provider)


def start_ceiling(
    stack: contextlib.ExitStack, work: Path, args: argparse.Namespace, service: Service
) -> Ceiling:
    """The independent ceiling beside the service: the same workers, tokens and page 1."""
    ceiling = Ceiling(service.provider, service.page, args.workers, work)
    stack.callback(ceiling.stop)
    ceiling.wait_ready(service.provider.token(service.hot), service.page)
    return ceiling


def present_tokens(args: argparse.Namespace, service: Service) -> None:
    """Every token to every worker, as clients with live sessions will have done: a token's
    first request verifies its signature, later ones reuse the claims. Each wrk run opens new
    connections, which the kernel spreads over the workers at random, so a few passes reach
    every worker with every thread's users."""
    for _ in range(TOKEN_PASSES):
        # Long enough for every token at a first request's cost: a user's first request on
        # a worker also verifies, reads their projects and writes their directory entry.
        seconds = max(1, math.ceil(service.minted / TOKENS_PER_SECOND))
        # A busy user's page past the end reads every task they see: they call /users/me.
        mode = "introduce" if args.dataset == "shared" else "tokens"
        run_wrk(args, service.server.base, mode, service.users, seconds)


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

        plans: list[Plan]
        if isinstance(dataset, SharedDataset):
            busy, projects = next(iter(dataset.busy.items()))
            plans = asyncio.run(
                explain_shared(data.async_url, user=busy, project=str(projects[0].id))
            )
            print(
                f"\nQuery plans for {busy}, who sees {dataset.visible(busy):,} tasks in "
                f"{len(projects) + 1} projects (each may read only their owners' partitions):"
            )
        else:
            heavy = dataset.owners[0]
            plans = asyncio.run(
                explain_scenarios(
                    data.async_url,
                    owner=heavy,
                    deep_offset=(dataset.sizes[0] // PAGE_SIZE - 1) * PAGE_SIZE,
                    task_id=dataset.sample_ids[heavy][0],
                )
            )
            print(f"\nQuery plans for owner {heavy} ({dataset.sizes[0]:,} tasks), deepest page:")
        for plan in plans:
            where = f"{len(plan.partitions)} partition(s), index" if plan.ok else "CHECK FAILED"
            print(f"  {plan.scenario:<18} {where}  {plan.summary()}")

        service = start_service(stack, work, args, data)
        server, env = service.server, service.env
        baseline: Service | None = None
        if args.baseline is not None:
            baseline_data = prepare_baseline(stack, work, args, data)
            baseline = start_service(
                stack, work, args, baseline_data, "baseline", beside=service,
                checkout=args.baseline,
            )  # fmt: skip
            if _page_ids(baseline.page) != _page_ids(service.page):
                sys.exit("bench: the baseline answers page 1 with other tasks")
        ceiling = start_ceiling(stack, work, args, service)
        print(
            f"\n{args.workers} workers each; wrk -t{args.threads} -c{args.connections}, "
            f"{args.warmup} s warm-up + {args.duration} s per scenario; the ceiling answers "
            f"the {len(service.page)} bytes of the hot owner's page 1"
        )
        print(
            "production settings but for TASKAPP_RATE_LIMIT=1000000/second (the limiter counts "
            "every request, never refuses one)"
            + (
                ""
                if args.database_tls or args.topology != "direct"
                else "; PostgreSQL over loopback without TLS, as deployed (--database-tls: with it)"
            )
            + "\n"
        )
        present_tokens(args, service)
        if baseline is not None:
            present_tokens(args, baseline)
        users = service.users

        def report(result: Result, who: str = "") -> Result:
            print(
                f"  {result.name:<8} {who:<9}{result.rps:8.0f} req/s  "
                f"p99 {result.p99_ms:6.1f} ms  errors {result.errors}"
                + (f"  replica reads {result.replica_reads:,}" if result.replica_reads else ""),
                flush=True,
            )
            return result

        first = report(_run_ceiling(args, ceiling, users))
        results: list[Result] = []
        comparisons: list[Comparison] = []
        for scenario in scenarios:
            if baseline is None:
                results.append(report(_run_scenario(args, server, scenario, users)))
                continue
            # Alternating, and each side first in every other pair (this, baseline, baseline,
            # this, ...), so that whatever else the machine does, and whatever a run leaves
            # behind for the next one, falls on both alike.
            comparison = Comparison(scenario)
            for pair in range(args.pairs):
                for side in ("this", "baseline") if pair % 2 == 0 else ("baseline", "this"):
                    if side == "this":
                        ours = report(_run_scenario(args, server, scenario, users), side)
                        comparison.ours.append(ours)
                    else:
                        theirs = report(_run_scenario(args, baseline.server, scenario, users), side)
                        theirs.title += " [baseline]"
                        comparison.theirs.append(theirs)
            comparisons.append(comparison)
            results += comparison.ours + comparison.theirs
        last = report(_run_ceiling(args, ceiling, users))
        yardstick = (first.rps + last.rps) / 2
        for result in results:
            result.ceiling_share = result.rps / yardstick
        first.title, last.title = f"{first.title}, first", f"{last.title}, last"
        results = [first, *results, last]
        problems = server.problems() + (baseline.server.problems() if baseline else [])
        server.stop()
        if baseline is not None:
            baseline.server.stop()
        ceiling.stop()

        machine = machine_facts(database_url, redis_url)
        print()
        print(_table(results))
        print(
            f"\nshare: of the ceiling's mean, {yardstick:,.0f} req/s (first and last run "
            f"{abs(first.rps - last.rps) / yardstick:.0%} apart)"
        )
        if comparisons:
            print(f"\nThis checkout against {args.baseline} (median of {args.pairs} runs each):")
            print(_comparison_table(comparisons, yardstick))
        print(
            f"\n{dataset.rows:,} tasks, {len(dataset.owners):,} owners{_shared_summary(dataset)}"
            f"; {machine['cpus']} CPUs "
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
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items() if k not in {"env"}
            } | {"server_env": shareable_env(env)},
            "dataset": {"kind": args.dataset, "rows": dataset.rows,
                        "owners": len(dataset.owners), "largest_owner": max(dataset.sizes),
                        "seed_seconds": round(data.seed_seconds, 1)} | _shared_facts(dataset),
            "plans": [asdict(plan) | {"ok": plan.ok} for plan in plans],
            "ceiling_rps": round(yardstick, 1),
            "results": [asdict(r) for r in results],
            "baseline": str(args.baseline) if args.baseline else None,
            "comparison": [c.summary(yardstick) for c in comparisons],
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


def _shared_summary(dataset: Dataset) -> str:
    if not isinstance(dataset, SharedDataset):
        return ""
    return f", {len(dataset.projects):,} shared projects ({len(dataset.busy):,} busy users)"


def _shared_facts(dataset: Dataset) -> dict[str, Any]:
    """What the shared data set holds beyond the Inboxes (nothing for the owners' one)."""
    if not isinstance(dataset, SharedDataset):
        return {}
    seen = sorted(dataset.visible(user) for user in dataset.busy)
    return {
        "projects": len(dataset.projects),
        "project_tasks": sum(p.size for p in dataset.projects),
        "largest_project": max(p.size for p in dataset.projects),
        "members": sum(len(p.members) for p in dataset.projects),
        "busy_users": len(dataset.busy),
        "busy_user_tasks_median": seen[len(seen) // 2],
        "busy_user_tasks_max": seen[-1],
    }


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
