"""The Python a request runs: function calls per request, counted in process with cProfile.

`make bench` measures throughput against the ceiling, and on these shared machines a run
moves by 10-25% from the next. What a request costs the interpreter does not: this serves
one kind of request from the production app in process (production settings, the local or
an embedded PostgreSQL and Redis, real RS256 tokens; no HTTP server, no socket to the
client), 16 at a time, and prints the Python calls each makes, the time cProfile saw per
request (inflated by the profiler itself: compare runs, never read it as a latency), and
where it went, by file and by function.

    .venv/bin/python -m bench.calls --kind get              # a read by id the cache misses
    .venv/bin/python -m bench.calls --kind hot --top 40     # page 1, answered by the cache

Kinds: hot (one owner's page 1, cached), list (pages the cache misses), get (reads by id the
cache misses), create, patch. A coroutine is counted once per resumption, as cProfile counts
it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import random
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvloop
from starlette.types import ASGIApp

from bench.run import _forget_keys, _service_url, _services

CONCURRENCY = 16
STATUSES = ("pending", "in_progress", "completed")
# (method, path, query string, token, body)
Request = tuple[str, str, str, str, bytes | None]
Message = MutableMapping[str, Any]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__)
    parser.add_argument("--kind", choices=("hot", "list", "get", "create", "patch"), default="get")
    parser.add_argument("--requests", type=int, help="requests profiled (default: per kind)")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--users", type=int, default=300, help="users, each with a token")
    parser.add_argument("--tasks", type=int, default=30, help="tasks each user creates first")
    return parser.parse_args(argv)


async def _call(app: ASGIApp, request: Request, state: dict[str, Any]) -> tuple[int, bytes]:
    """One request through the app, as an ASGI server would hand it over."""
    method, path, query, token, body = request
    headers = [(b"host", b"taskapp.bench"), (b"authorization", f"Bearer {token}".encode())]
    if body is not None:
        headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope: Message = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode(), "headers": headers, "client": ("127.0.0.1", 40000),
        "server": ("taskapp.bench", 80), "state": dict(state),
    }  # fmt: skip
    sent = False
    answer: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # the client never disconnects
        sent = True
        return {"type": "http.request", "body": body or b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"]


@contextlib.asynccontextmanager
async def _started(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """The app's lifespan, started; yields the state each request is given a copy of."""
    state: dict[str, Any] = {}
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    started = asyncio.get_running_loop().create_future()

    async def send(message: Message) -> None:
        if message["type"].startswith("lifespan.startup") and not started.done():
            started.set_result(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}

    async def serve() -> None:
        await app(scope, inbox.get, send)

    lifespan = asyncio.create_task(serve())
    await inbox.put({"type": "lifespan.startup"})
    outcome = await started
    if outcome["type"] != "lifespan.startup.complete":
        raise SystemExit(f"bench.calls: the app did not start: {outcome}")
    try:
        yield state
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan


async def _run_all(app: ASGIApp, requests: list[Request], state: dict[str, Any]) -> None:
    async def client(k: int) -> None:
        for request in requests[k::CONCURRENCY]:
            status, body = await _call(app, request, state)
            if status >= 300:
                raise SystemExit(f"bench.calls: {request[:3]} answered {status}: {body[:200]!r}")

    await asyncio.gather(*(client(k) for k in range(CONCURRENCY)))


async def _profile(args: argparse.Namespace, issuer_tokens: Callable[[str], str]) -> None:
    from taskapp.app import create_app
    from taskapp.config import Settings
    from taskapp.state import state_of

    app: Any = create_app(Settings())
    async with _started(app) as state:
        users = [str(uuid.uuid4()) for _ in range(args.users)]
        tokens = {user: issuer_tokens(user) for user in users}
        ids: dict[str, list[str]] = {user: [] for user in users}
        for user in users:
            for number in range(args.tasks):
                body = json.dumps({"title": f"Task {number}", "description": "Some words"})
                seed = ("POST", "/tasks", "", tokens[user], body.encode())
                status, answer = await _call(app, seed, state)
                if status != 201:
                    raise SystemExit(f"bench.calls: seeding answered {status}: {answer[:200]!r}")
                ids[user].append(json.loads(answer)["id"])

        pages = -(-args.tasks // 10)  # of 10 tasks
        rng = random.Random(1)  # reproducible changes, not secrecy  # nosec B311

        def request(i: int) -> Request:
            user = users[i % args.users]
            turn = i // args.users
            if args.kind == "hot":
                return ("GET", "/tasks", "page=1&page_size=10", tokens[users[0]], None)
            if args.kind == "list":
                query = f"page={1 + turn % pages}&page_size=10"
                return ("GET", "/tasks", query, tokens[user], None)
            if args.kind == "get":
                return ("GET", f"/tasks/{ids[user][turn % args.tasks]}", "", tokens[user], None)
            if args.kind == "create":
                body = b'{"title":"Bench task","description":"Created under load"}'
                return ("POST", "/tasks", "", tokens[user], body)
            body = json.dumps({"status": rng.choice(STATUSES)}).encode()
            task = rng.choice(ids[user])
            return ("PATCH", f"/tasks/{task}", "", tokens[user], body)

        # Every (user, page) and task once: each read misses the cache when it starts empty.
        default = {"hot": 20_000, "list": args.users * pages, "get": args.users * args.tasks}
        count = args.requests or default.get(args.kind, 3_000)
        requests = [request(i) for i in range(count)]
        misses = args.kind in {"list", "get"}
        # A first pass warms every pool connection, statement and token.
        await _run_all(app, requests, state)
        if misses:
            await state_of({"state": state}).cache.clear()
        profiler = cProfile.Profile()
        profiler.enable()
        await _run_all(app, requests, state)
        profiler.disable()
    _report(args, profiler, count)


def _report(args: argparse.Namespace, profiler: cProfile.Profile, count: int) -> None:
    stats: Any = pstats.Stats(profiler)
    entries: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats
    calls = sum(entry[1] for entry in entries.values())
    print(
        f"{args.kind}: {count:,} requests, {calls / count:,.0f} Python calls per request, "
        f"{stats.total_tt / count * 1e6:,.0f} µs profiled per request"
    )
    by_file: dict[str, float] = {}
    rows = []
    for (filename, line, function), (_, ncalls, own, total, _) in entries.items():
        where = _short(filename)
        by_file[where] = by_file.get(where, 0.0) + own
        rows.append((own, total, ncalls, f"{where}:{line}({function})"))
    print("\nown µs per request, by file:")
    for where, own in sorted(by_file.items(), key=lambda item: -item[1])[: args.top]:
        print(f"{own / count * 1e6:8.1f}  {where}")
    print("\nown µs · with callees µs · calls, per request, by function:")
    for own, total, ncalls, name in sorted(rows, reverse=True)[: args.top]:
        print(f"{own / count * 1e6:8.2f} {total / count * 1e6:8.1f} {ncalls / count:6.1f}  {name}")


def _short(filename: str) -> str:
    for marker in ("site-packages/", f"{Path(__file__).parent.parent}/", "python3.11/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename  # a built-in ("~")


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    from taskapp.database.migrations import upgrade_database
    from testing.oidc import serve_provider

    with (
        tempfile.TemporaryDirectory(prefix="taskapp-calls-") as scratch,
        _services(Path(scratch)) as (url, redis_url),
        contextlib.contextmanager(serve_provider)() as provider,
    ):
        upgrade_database(url)
        metrics = Path(scratch) / "metrics"
        metrics.mkdir()
        os.environ.update({
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            "TASKAPP_ENV": "production",
            "TASKAPP_DATABASE_URL": _service_url(url, tls=False),
            "TASKAPP_REDIS_URL": redis_url,
            "TASKAPP_REDIS_KEY_PREFIX": f"calls-{uuid.uuid4().hex[:12]}:",
            "TASKAPP_OIDC_ISSUER": provider.issuer,
            "TASKAPP_METRICS_TOKEN": secrets.token_urlsafe(32),
            "TASKAPP_NOTIFICATIONS_QUEUE": f"calls-{uuid.uuid4().hex[:12]}",
            # As `make bench`: counted in Redis, never refused.
            "TASKAPP_RATE_LIMIT": "1000000/second",
        })  # fmt: skip
        try:
            uvloop.run(_profile(args, provider.token))
        finally:
            _forget_keys(redis_url, os.environ["TASKAPP_REDIS_KEY_PREFIX"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
