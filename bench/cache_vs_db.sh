#!/usr/bin/env bash
# GET /tasks with the Redis response cache against without it, on the same data, same machine,
# same run. Seeds BENCH_TASKS tasks for one user into a scratch database, then serves them
# with `taskapp serve` twice in turn (TASKAPP_CACHE_ENABLED=true, then false) and loads each
# with wrk after a short warm-up. Prints req/s and latency percentiles; cleans up after itself.
#
# Needs: `make install` (.venv) and wrk (apt-get install wrk). PostgreSQL and Redis: the local
# ones on 127.0.0.1:5432 / :6379 when they answer, else embedded ones (as the tests do);
# TASKAPP_TEST_DATABASE_URL / TASKAPP_TEST_REDIS_URL point elsewhere.
#
# Knobs (environment): BENCH_TASKS=2000 BENCH_DURATION=10s BENCH_WARMUP=3s BENCH_THREADS=2
# BENCH_CONNECTIONS=32 BENCH_WORKERS=2 BENCH_PAGE_SIZE=10 BENCH_LOG_LEVEL=warning
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
TASKAPP="$ROOT/.venv/bin/taskapp"
[[ -x "$PY" && -x "$TASKAPP" ]] || { echo "bench: no .venv here; run \`make install\` first" >&2; exit 1; }
command -v wrk >/dev/null || { echo "bench: wrk not found (apt-get install wrk)" >&2; exit 1; }

TASKS="${BENCH_TASKS:-2000}"
DURATION="${BENCH_DURATION:-10s}"
WARMUP="${BENCH_WARMUP:-3s}"
THREADS="${BENCH_THREADS:-2}"
CONNECTIONS="${BENCH_CONNECTIONS:-32}"
WORKERS="${BENCH_WORKERS:-2}"
PAGE_SIZE="${BENCH_PAGE_SIZE:-10}"
LOG_LEVEL="${BENCH_LOG_LEVEL:-warning}"  # uvicorn's access log per request would dominate
OWNER="bench-user"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/taskapp-bench.XXXXXX")"
HELPER_PID=""
SERVER_PID=""

stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -INT "$SERVER_PID"
        for _ in $(seq 300); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

cleanup() {
    stop_server
    if [[ -n "$HELPER_PID" ]] && kill -0 "$HELPER_PID" 2>/dev/null; then
        kill -TERM "$HELPER_PID"  # drops the scratch database and the Redis keys
        wait "$HELPER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The services for both runs, kept alive until this script ends: a scratch database seeded
# with the tasks, a Redis key prefix of its own, and a local OIDC provider (the tests' one)
# that publishes the key the bearer token is signed with.
cat >"$WORK/helper.py" <<'EOF'
import asyncio, contextlib, shlex, signal, sys, time, uuid
from pathlib import Path

import asyncpg
import redis

from taskapp.db import upgrade_database
from tests.fixtures.oidc import serve_provider
from tests.fixtures.services import postgres_server, redis_server, scratch_database

env_file, tasks, owner, work = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


async def seed(url: str) -> None:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.execute(
            """
            INSERT INTO tasks (owner, id, title, description, status, created_at, updated_at)
            SELECT $1, gen_random_uuid(), 'Task ' || i, 'Seeded for the benchmark',
                   (ARRAY['pending', 'in_progress', 'completed'])[1 + i % 3],
                   now() - make_interval(secs => i), now() - make_interval(secs => i)
            FROM generate_series(1, $2) AS i
            """,
            owner,
            tasks,
        )
        await connection.execute("ANALYZE tasks")
    finally:
        await connection.close()


prefix = f"bench-{uuid.uuid4().hex}:"
with postgres_server(work) as admin_url, redis_server(work) as redis_url:
    with scratch_database(admin_url, prefix="taskapp_bench") as database_url:
        upgrade_database(database_url)
        asyncio.run(seed(database_url))
        # Closed by the stack while its thread still runs (at interpreter exit it would hang).
        stack = contextlib.ExitStack()
        provider = stack.enter_context(contextlib.contextmanager(serve_provider)())
        values = {
            "TASKAPP_DATABASE_URL": database_url,
            "TASKAPP_REDIS_URL": redis_url,
            "TASKAPP_OIDC_ISSUER": provider.issuer,
            "BENCH_KEY_PREFIX": prefix,
            "BENCH_TOKEN": provider.token(owner, exp=int(time.time()) + 6 * 3600),
        }
        partial = env_file.with_suffix(".partial")
        partial.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
        partial.rename(env_file)
        try:
            while True:
                time.sleep(3600)
        finally:
            stack.close()
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(match=prefix + "*", count=1000):
                client.delete(key)
            client.close()
EOF
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    "$PY" "$WORK/helper.py" "$WORK/env" "$TASKS" "$OWNER" "$WORK" >"$WORK/helper.log" 2>&1 &
HELPER_PID=$!
for _ in $(seq 1200); do
    [[ -f "$WORK/env" ]] && break
    kill -0 "$HELPER_PID" 2>/dev/null || { cat "$WORK/helper.log" >&2; exit 1; }
    sleep 0.1
done
[[ -f "$WORK/env" ]] || { echo "bench: set-up timed out" >&2; cat "$WORK/helper.log" >&2; exit 1; }
# shellcheck disable=SC1091
source "$WORK/env"

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until the server answers, then checks it serves the seeded page to the token.
check_ready() {
    "$PY" - "$1" "$BENCH_TOKEN" "$TASKS" "$PAGE_SIZE" <<'EOF'
import sys, time
import httpx

url, token, tasks, page_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 60
while True:
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5)
        break
    except httpx.HTTPError:
        if time.monotonic() > deadline:
            sys.exit("bench: the server did not start")
        time.sleep(0.2)
body = response.json()
if response.status_code != 200 or body["total"] != tasks or len(body["items"]) != page_size:
    sys.exit(f"bench: unexpected answer {response.status_code}: {response.text[:300]}")
EOF
}

declare -A RPS P50 P99 ERRORS
for cache in true false; do
    port="$(free_port)"
    url="http://127.0.0.1:$port/tasks?page=1&page_size=$PAGE_SIZE"
    # The per-user limit far above the load; not higher: past ~4M/second the limiter's GCRA
    # interval is below the float resolution of its millisecond clock and its script fails.
    TASKAPP_ENV=production \
    TASKAPP_LOG_LEVEL="$LOG_LEVEL" \
    TASKAPP_CACHE_ENABLED="$cache" \
    TASKAPP_REDIS_KEY_PREFIX="${BENCH_KEY_PREFIX}cache-$cache:" \
    TASKAPP_RATE_LIMIT=1000000/second \
    TASKAPP_DATABASE_URL="$TASKAPP_DATABASE_URL" \
    TASKAPP_REDIS_URL="$TASKAPP_REDIS_URL" \
    TASKAPP_OIDC_ISSUER="$TASKAPP_OIDC_ISSUER" \
        "$TASKAPP" serve --host 127.0.0.1 --port "$port" --workers "$WORKERS" \
        >"$WORK/serve-$cache.log" 2>&1 &
    SERVER_PID=$!
    check_ready "$url" || { cat "$WORK/serve-$cache.log" >&2; exit 1; }

    wrk_args=(-t"$THREADS" -c"$CONNECTIONS" -H "Authorization: Bearer $BENCH_TOKEN")
    wrk "${wrk_args[@]}" -d"$WARMUP" "$url" >/dev/null
    echo "== TASKAPP_CACHE_ENABLED=$cache: wrk ${wrk_args[*]:0:2} -d$DURATION --latency '$url'"
    wrk "${wrk_args[@]}" -d"$DURATION" --latency "$url" | tee "$WORK/wrk-$cache.txt"
    echo
    stop_server

    RPS[$cache]="$(awk '/^Requests\/sec:/ {print $2}' "$WORK/wrk-$cache.txt")"
    P50[$cache]="$(awk '$1 == "50%" {print $2}' "$WORK/wrk-$cache.txt")"
    P99[$cache]="$(awk '$1 == "99%" {print $2}' "$WORK/wrk-$cache.txt")"
    ERRORS[$cache]="$(awk '/Non-2xx or 3xx responses:/ {print $NF} /Socket errors:/ {print "socket-errors"}' \
        "$WORK/wrk-$cache.txt" | paste -sd' ')"
    logged="$(grep -cE ' (WARNING|ERROR|CRITICAL) ' "$WORK/serve-$cache.log" || true)"
    if [[ "$logged" != 0 ]]; then
        ERRORS[$cache]="${ERRORS[$cache]:+${ERRORS[$cache]} }server-log-warnings:$logged"
        grep -E ' (WARNING|ERROR|CRITICAL) ' "$WORK/serve-$cache.log" | head -3 >&2
    fi
done

echo "== GET /tasks?page=1&page_size=$PAGE_SIZE, $TASKS tasks of one user; $WORKERS workers;" \
     "wrk -t$THREADS -c$CONNECTIONS -d$DURATION; $(nproc) CPUs shared by wrk, taskapp, PostgreSQL, Redis"
printf '%-10s %12s %10s %10s %s\n' "cache" "req/s" "p50" "p99" "errors"
for cache in true false; do
    printf '%-10s %12s %10s %10s %s\n' \
        "$([[ $cache == true ]] && echo cached || echo uncached)" \
        "${RPS[$cache]}" "${P50[$cache]}" "${P99[$cache]}" "${ERRORS[$cache]:-none}"
done
awk -v c="${RPS[true]}" -v u="${RPS[false]}" 'BEGIN { printf "cached / uncached: %.2fx\n", c / u }'
if [[ -n "${ERRORS[true]}${ERRORS[false]}" ]]; then
    echo "bench: some requests failed; the figures above are not valid" >&2
    exit 1
fi
