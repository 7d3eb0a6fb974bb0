"""`taskapp run`: the whole stack on one machine, on embedded servers unless configured."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys

from taskapp.cli.migrate import migrate
from taskapp.cli.serve import metrics_directory, serve_app
from taskapp.cli.settings import load_settings


def cmd_run(args: argparse.Namespace) -> None:
    """Development mode: embedded PostgreSQL/Redis unless configured, dev tokens, migrations."""
    from taskapp.auth.devkey import load_or_create_dev_key
    from taskapp.cli.embedded import data_dir_lock, embedded_postgres, embedded_redis
    from taskapp.cli.mailsink import start_mail_sink

    settings = load_settings()
    if settings.is_production:
        sys.exit("taskapp run is the development mode; use `taskapp serve` in production")
    data_dir = settings.data_dir.resolve()
    os.environ["TASKAPP_DATA_DIR"] = str(data_dir)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(data_dir_lock(data_dir))
        except BlockingIOError:
            sys.exit(f"taskapp run is already running with the data directory {data_dir}")
        if settings.database.url is not None:
            database_url = settings.database.url.get_secret_value()
        else:
            print(f"Starting embedded PostgreSQL in {data_dir / 'postgres'}", flush=True)
            database_url = stack.enter_context(embedded_postgres(data_dir / "postgres"))
            os.environ["TASKAPP_DATABASE_URL"] = database_url
        if settings.redis.url is None:
            print(f"Starting embedded Redis in {data_dir / 'redis'}", flush=True)
            os.environ["TASKAPP_REDIS_URL"] = stack.enter_context(
                embedded_redis(data_dir / "redis")
            )
        if settings.oidc.issuer is None:
            load_or_create_dev_key(data_dir)
            os.environ["TASKAPP_OIDC_TRUST_DEV_KEY"] = "true"
            print(
                "Auth: dev signing key; mint a token with `taskapp token --sub alice --roles user`",
                flush=True,
            )
        migrate(database_url)
        if settings.smtp.url is None:
            mail_dir = data_dir / "mail"
            port = _free_port()
            sink = start_mail_sink(mail_dir, port)
            stack.callback(sink.stop)
            os.environ["TASKAPP_SMTP_URL"] = f"smtp://127.0.0.1:{port}"
            print(f"Mail: captured as .eml files in {mail_dir}", flush=True)
        # The worker's notification counters show up in the API's /metrics too, so the
        # worker serves none of its own (which would also empty this shared directory).
        stack.enter_context(metrics_directory())
        if settings.notifications.enabled:
            worker = subprocess.Popen(
                [sys.executable, "-m", "taskapp.cli", "worker", "--concurrency", "1"],
                env={**os.environ, "TASKAPP_WORKER_METRICS_PORT": ""},
            )
            stack.callback(_stop_process, worker)
        print(f"Serving taskapp on http://{args.host}:{args.port} (docs at /docs)", flush=True)
        serve_app(settings, args.host, args.port, args.workers)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # Celery's warm shutdown: running jobs finish first
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
