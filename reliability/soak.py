"""`make soak`: sustained mixed load at a fixed rate, watched for errors, leaks and drift.

Seeds a data set and serves it as production does (the benchmark's harness: `taskapp serve
--workers N`, real PostgreSQL and Redis, real RS256 tokens of many users), then sends 80%
reads / 20% writes at a fixed rate with wrk, in back-to-back segments (a minute each by
default) after a warm-up. Meanwhile it samples the RSS of every worker process and the
service's PostgreSQL connections. It prints a table per segment and the verdicts:

- no error response and no socket error, warm-up included, and no warning in the server log;
- the rate held (each segment within 5% of `--rate`) and the same worker processes throughout;
  requests the schedule had to send over 10 ms late (every connection of a wrk thread busy)
  are counted, since their wait before sending is not in wrk's latencies;
- the RSS of each worker grew less than 10% from the end of the warm-up to the end;
- PostgreSQL connections never above workers x (pool_size + max_overflow);
- p99 of the last segment at most 1.5x that of the first.

Exit status 1 when any fails. The figures are saved as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.run import (
    RESULTS,
    ROOT,
    TOPOLOGIES,
    Server,
    machine_facts,
    prepare_data,
    run_wrk,
    shareable_env,
    start_service,
)
from taskapp.config import DatabaseSettings

MIB = 2**20
# A segment may fall this far short of the rate before the load counts as not held.
RATE_TOLERANCE = 0.05


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss: dict[int, int]  # worker pid -> bytes
    db_connections: int


@dataclass
class Segment:
    name: str  # "warm-up", or the segment's number from 1
    started: float  # seconds since the load started
    ended: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    error_kinds: dict[str, int]
    # Requests sent over 10 ms after their slot (all of a thread's connections were busy);
    # wrk times from the sending, so that wait is not in the percentiles.
    late: int
    late_max_ms: float
    rss_mib: dict[int, float] = field(default_factory=dict)  # last sample in the segment
    db_connections: int = 0  # the most seen in the segment


@dataclass
class Verdict:
    check: str
    ok: bool
    detail: str


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make soak", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds measured")
    parser.add_argument("--rate", type=float, default=350, help="requests per second, in total")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load before")
    parser.add_argument("--segment", type=float, default=60, help="seconds per table row")
    parser.add_argument("--rows", type=int, default=100_000, help="tasks to seed")
    parser.add_argument("--owners", type=int, help="owners (default rows / 100)")
    parser.add_argument("--users", type=int, default=1000, help="owners given tokens")
    # Enough connections that the rate holds while responses are slow (a connection carries
    # one request at a time); a thread's users keep to its connections.
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=16, help="wrk threads")
    parser.add_argument("--workers", type=int, default=2, help="taskapp serve --workers")
    parser.add_argument("--sample-interval", type=float, default=2.0, help="seconds")
    parser.add_argument("--log-level", default="info", help="TASKAPP_LOG_LEVEL of the server")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server environment")  # fmt: skip
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--max-p99-ratio", type=float, default=1.5)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--label", default="", help="a word for the result file name")
    parser.add_argument(
        "--topology", choices=TOPOLOGIES, default="direct", help="as `make bench` --topology"
    )
    parser.add_argument(
        "--database-tls", action="store_true", help="as `make bench` --database-tls"
    )
    args = parser.parse_args(argv)
    args.owners = args.owners or max(100, args.rows // 100)
    args.dataset = "owners"  # `make bench`'s data set of Inboxes, which the mixed load reads
    if args.rate <= 0 or args.duration < args.segment or args.segment <= 0:
        parser.error("--rate must be positive and --duration at least one --segment")
    return args


def worker_processes(server_pid: int) -> list[psutil.Process]:
    """The server's worker processes: its children, less multiprocessing's helpers."""
    workers = []
    for child in psutil.Process(server_pid).children():
        with contextlib.suppress(psutil.Error):
            if not any("resource_tracker" in part for part in child.cmdline()):
                workers.append(child)
    return workers


class Sampler(threading.Thread):
    """Every `interval` seconds: RSS of each worker, PostgreSQL connections of the service."""

    def __init__(self, server_pid: int, database_url: str, interval: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.server_pid = server_pid
        self.database_url = database_url
        self.interval = interval
        self.origin = time.monotonic()
        self.samples: list[Sample] = []
        self.failure: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(
                self.database_url, autocommit=True, application_name="taskapp-soak"
            ) as connection:
                while True:
                    self.samples.append(self._sample(connection))
                    if self._stop_event.wait(self.interval):
                        return
        except BaseException as exc:  # reported by the verdicts, not lost in a thread
            self.failure = exc

    def _sample(self, connection: psycopg.Connection[Any]) -> Sample:
        rss = {}
        for worker in worker_processes(self.server_pid):
            with contextlib.suppress(psutil.Error):
                rss[worker.pid] = worker.memory_info().rss
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'taskapp' AND datname = current_database()"
        ).fetchone()
        return Sample(time.monotonic() - self.origin, rss, row[0] if row else 0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def _segment(name: str, started: float, ended: float, raw: dict[str, Any]) -> Segment:
    errors = {kind: count for kind, count in raw["errors"].items() if count}
    return Segment(
        name=name,
        started=started,
        ended=ended,
        requests=raw["requests"],
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        errors=sum(errors.values()),
        error_kinds=errors,
        late=raw["late"],
        late_max_ms=raw["late_max_us"] / 1000,
    )


def attach_samples(segments: list[Segment], samples: list[Sample]) -> None:
    """Each segment's last RSS per worker and its most DB connections."""
    for segment in segments:
        inside = [s for s in samples if segment.started <= s.at <= segment.ended]
        if inside:
            segment.rss_mib = {pid: rss / MIB for pid, rss in inside[-1].rss.items()}
            segment.db_connections = max(s.db_connections for s in inside)


def verdicts(
    segments: list[Segment],
    samples: list[Sample],
    *,
    rate: float,
    warmup_end: float,
    workers: int,
    db_limit: int,
    max_rss_growth: float,
    max_p99_ratio: float,
    log_problems: list[str],
) -> list[Verdict]:
    """The checks of a run; `segments` starts with the warm-up's when there was one."""
    measured = [s for s in segments if s.name != "warm-up"]
    out = []

    errors = sum(s.errors for s in segments)
    kinds: dict[str, int] = {}
    for segment in segments:
        for kind, count in segment.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + count
    detail = f"{errors} of {sum(s.requests for s in segments):,} requests"
    if kinds:
        detail += " (" + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) + ")"
    out.append(Verdict("errors = 0", errors == 0, detail))
    out.append(
        Verdict(
            "server log clean",
            not log_problems,
            f"{len(log_problems)} warning/error lines"
            + (f", first: {log_problems[0][:200]}" if log_problems else ""),
        )
    )

    slowest = min(measured, key=lambda s: s.rps) if measured else None
    late = sum(s.late for s in measured)
    out.append(
        Verdict(
            f"rate held (each segment >= {1 - RATE_TOLERANCE:.0%} of {rate:g} req/s)",
            slowest is not None and slowest.rps >= rate * (1 - RATE_TOLERANCE),
            f"lowest {slowest.rps:.1f} req/s (segment {slowest.name}); {late:,} requests sent "
            f"> 10 ms late (max {max(s.late_max_ms for s in measured):.0f} ms)"
            if slowest
            else "no data",
        )
    )

    pids = [set(s.rss) for s in samples]
    first_pids = pids[0] if pids else set()
    steady = bool(pids) and len(first_pids) == workers and all(p == first_pids for p in pids)
    out.append(
        Verdict(
            f"{workers} workers, none restarted",
            steady,
            f"{len(first_pids)} at the start, {len(set().union(*pids)) if pids else 0} pids seen",
        )
    )

    before = [s for s in samples if s.at <= warmup_end] or samples[:1]
    growths = []
    for pid in sorted(first_pids):
        start = next((s.rss[pid] for s in reversed(before) if pid in s.rss), None)
        end = next((s.rss[pid] for s in reversed(samples) if pid in s.rss), None)
        if start and end:
            growths.append((pid, start, end, end / start - 1))
    out.append(
        Verdict(
            f"RSS growth per worker after warm-up < {max_rss_growth:.0%}",
            bool(growths) and steady and all(g < max_rss_growth for *_, g in growths),
            "; ".join(
                f"pid {pid} {start / MIB:.1f} -> {end / MIB:.1f} MiB ({growth:+.1%})"
                for pid, start, end, growth in growths
            )
            or "no samples",
        )
    )

    most = max((s.db_connections for s in samples), default=0)
    out.append(
        Verdict(
            f"DB connections <= {db_limit} (workers x (pool_size + max_overflow))",
            bool(samples) and most <= db_limit,
            f"max {most} in {len(samples)} samples",
        )
    )

    if len(measured) >= 2 and measured[0].p99_ms > 0:
        ratio = measured[-1].p99_ms / measured[0].p99_ms
        out.append(
            Verdict(
                f"p99 last segment / first <= {max_p99_ratio:g}x",
                ratio <= max_p99_ratio,
                f"{measured[-1].p99_ms:.1f} / {measured[0].p99_ms:.1f} ms = {ratio:.2f}x",
            )
        )
    else:
        out.append(Verdict(f"p99 last segment / first <= {max_p99_ratio:g}x", False,
                           "needs two measured segments"))  # fmt: skip
    return out


def _table(segments: list[Segment], pids: list[int], segment_seconds: float) -> str:
    unit = "minute" if segment_seconds == 60 else f"{segment_seconds:g} s"
    rss_heads = " ".join(f"{'RSS ' + str(pid):>12}" for pid in pids)
    lines = [
        f"{unit:>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6} "
        f"{'late':>6} {rss_heads} {'DB conns':>8}"
    ]
    for s in segments:
        rss = " ".join(
            f"{s.rss_mib[pid]:>8.1f} MiB" if pid in s.rss_mib else f"{'-':>12}" for pid in pids
        )
        lines.append(
            f"{s.name:>8} {s.rps:>7.1f} {s.p50_ms:>7.1f} {s.p99_ms:>7.1f} {s.max_ms:>7.1f} "
            f"{s.errors:>6} {s.late:>6} {rss} {s.db_connections:>8}"
        )
    return "\n".join(lines)


def _db_limit(env: dict[str, str], workers: int) -> tuple[int, DatabaseSettings]:
    """workers x (pool_size + max_overflow), as the server's settings have them."""
    given: dict[str, Any] = {
        name.removeprefix("TASKAPP_DATABASE_").lower(): value
        for name, value in env.items()
        if name in {"TASKAPP_DATABASE_POOL_SIZE", "TASKAPP_DATABASE_MAX_OVERFLOW"}
    }
    settings = DatabaseSettings(**given)
    return workers * (settings.pool_size + settings.max_overflow), settings


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if shutil.which("wrk") is None:
        sys.exit("soak: wrk not found (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="taskapp-soak-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        data = prepare_data(stack, work, args)
        service = start_service(stack, work, args, data, label="soak")
        server: Server = service.server
        db_limit, pool = _db_limit(service.env, args.workers)
        count = math.ceil(args.duration / args.segment)
        print(
            f"\n{args.workers} workers (pool {pool.pool_size} + overflow {pool.max_overflow} each);"
            f" wrk -t{args.threads} -c{args.connections} paced at {args.rate:g} req/s, mixed"
            f" (40% list, 40% get, 10% create, 10% patch); {args.warmup:g} s warm-up, then"
            f" {count} x {args.segment:g} s; samples every {args.sample_interval:g} s\n",
            flush=True,
        )

        sampler = Sampler(server.process.pid, data.database_url, args.sample_interval)
        sampler.start()
        stack.callback(sampler.stop)
        segments: list[Segment] = []

        def load(name: str, seconds: float) -> Segment:
            started = time.monotonic() - sampler.origin
            raw = run_wrk(args, server.base, "mixed", service.users, seconds, rate=args.rate)
            segment = _segment(name, started, time.monotonic() - sampler.origin, raw)
            segments.append(segment)
            print(
                f"  {name:>8}: {segment.rps:7.1f} req/s  p50 {segment.p50_ms:6.1f} ms  "
                f"p99 {segment.p99_ms:6.1f} ms  errors {segment.errors}",
                flush=True,
            )
            return segment

        if args.warmup > 0:
            load("warm-up", args.warmup)
        warmup_end = time.monotonic() - sampler.origin
        for number in range(1, count + 1):
            load(str(number), min(args.segment, args.duration - (number - 1) * args.segment))
        sampler.stop()
        problems = server.problems()
        server.stop()

        samples = sampler.samples
        attach_samples(segments, samples)
        pids = sorted(samples[0].rss) if samples else []
        results = verdicts(
            segments,
            samples,
            rate=args.rate,
            warmup_end=warmup_end,
            workers=args.workers,
            db_limit=db_limit,
            max_rss_growth=args.max_rss_growth,
            max_p99_ratio=args.max_p99_ratio,
            log_problems=problems,
        )
        if sampler.failure is not None:
            results.append(Verdict("sampling", False, repr(sampler.failure)))

        machine = machine_facts(data.database_url, data.redis_url)
        print()
        print(_table(segments, pids, args.segment))
        print(
            f"\n{data.dataset.rows:,} tasks, {len(data.dataset.owners):,} owners, "
            f"{service.minted:,} users; {machine['cpus']} CPUs ({machine['cpu']}) shared by wrk, "
            f"taskapp, PostgreSQL {machine['postgresql']} and Redis {machine['redis']}; "
            f"{machine['date']}\n"
        )
        for verdict in results:
            print(f"  {'PASS' if verdict.ok else 'FAIL'}  {verdict.check}: {verdict.detail}")

        args.results.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        label = f"-{args.label}" if args.label else ""
        out = args.results / f"{stamp}-soak-{data.dataset.rows}rows-{args.rate:g}rps{label}.json"
        document = {
            "machine": machine,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if k != "env"} | {"server_env": shareable_env(service.env),
                                            "db_connection_limit": db_limit},
            "dataset": {"rows": data.dataset.rows, "owners": len(data.dataset.owners),
                        "users": service.minted},
            "segments": [asdict(s) for s in segments],
            "samples": [asdict(s) for s in samples],
            "verdicts": [asdict(v) for v in results],
            "server_log_problems": problems[:20],
        }  # fmt: skip
        out.write_text(json.dumps(document, indent=2) + "\n")
        shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
        print(f"\nsaved {shown}")

    failed = [v.check for v in results if not v.ok]
    if failed:
        print(f"soak: FAILED: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
