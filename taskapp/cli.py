"""The `taskapp` command: run | serve | worker | beat | migrate | token."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from taskapp.config import Environment, EnvironmentSettings, Settings

APP = "taskapp.app:create_app"


def _settings() -> Settings:
    """Settings from the environment, or a readable list of what is wrong, then exit."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"  - {where}: {error['msg']}")
        sys.exit("taskapp: invalid configuration:\n" + "\n".join(lines))


@contextlib.contextmanager
def _metrics_directory() -> Iterator[None]:
    """Metrics of all processes started from here meet in one directory, fresh for each
    start (so counters never carry over from a previous run) and removed afterwards."""
    import shutil
    import tempfile

    metrics_dir = tempfile.mkdtemp(prefix="taskapp-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        yield
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@contextlib.contextmanager
def _own_metrics_directory() -> Iterator[None]:
    """The metrics directory of this process and those it starts: PROMETHEUS_MULTIPROC_DIR
    when given (a container's; emptied, so totals start from zero), else a fresh one."""
    preset = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if preset:
        for stale in Path(preset).glob("*.db"):
            stale.unlink(missing_ok=True)
        yield
    else:
        with _metrics_directory():
            yield


def serve_app(settings: Settings, host: str, port: int, workers: int, app: str = APP) -> None:
    """Serve the factory `app` the way `taskapp serve` does (the benchmark reuses this)."""
    import uvicorn

    from taskapp.observability.logging import configure_logging
    from taskapp.serving import HTTP_PROTOCOL, run_workers

    # The supervisor's own lines (workers started, restarted, stopped) go through the same
    # formatter as the workers'; uvicorn's loggers then propagate to it.
    configure_logging(settings.log_level, json_lines=settings.json_logs)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_own_metrics_directory())
        options: dict[str, Any] = {
            "factory": True,
            "host": host,
            "port": port,
            "workers": workers,
            "http": HTTP_PROTOCOL,  # TCP_NODELAY on every connection, whatever the loop
            "log_level": settings.log_level.lower(),
            "log_config": None,  # keep the logging set up above
            "server_header": False,
            # X-Forwarded-For is read by the rate limiter, from TASKAPP_TRUSTED_PROXIES only
            # (ratelimit.client_ip). uvicorn's own reading would believe any peer on loopback
            # (FORWARDED_ALLOW_IPS) and hand the app that peer's choice of client address.
            "proxy_headers": False,
            "timeout_graceful_shutdown": 20,
            "access_log": False,  # taskapp logs each request itself (observability/http.py)
        }
        if workers > 1:
            try:
                run_workers(uvicorn.Config(app, **options))
            except OSError as exc:
                sys.exit(f"taskapp: cannot listen on {host}:{port}: {exc.strerror or exc}")
        else:
            uvicorn.run(app, **options)


def _migrate(url: str) -> None:
    """Apply the migrations, or exit with one line saying why they could not be."""
    from sqlalchemy.exc import DBAPIError

    from taskapp.db import upgrade_database

    try:
        upgrade_database(url)
    except (OSError, DBAPIError) as exc:
        sys.exit(f"taskapp: cannot migrate the database: {exc!r}")


def cmd_run(args: argparse.Namespace) -> None:
    """Development mode: embedded PostgreSQL/Redis unless configured, dev tokens, migrations."""
    from taskapp.auth.devkey import load_or_create_dev_key
    from taskapp.embedded import data_dir_lock, embedded_postgres, embedded_redis
    from taskapp.notifications.mailsink import start_mail_sink

    settings = _settings()
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
        _migrate(database_url)
        if settings.smtp.url is None:
            mail_dir = data_dir / "mail"
            port = _free_port()
            sink = start_mail_sink(mail_dir, port)
            stack.callback(sink.stop)
            os.environ["TASKAPP_SMTP_URL"] = f"smtp://127.0.0.1:{port}"
            print(f"Mail: captured as .eml files in {mail_dir}", flush=True)
        # The worker's notification counters show up in the API's /metrics too, so the
        # worker serves none of its own (which would also empty this shared directory).
        stack.enter_context(_metrics_directory())
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


def cmd_serve(args: argparse.Namespace) -> None:
    """Production server: configured services only; never trusts the dev key."""
    os.environ.pop("TASKAPP_OIDC_TRUST_DEV_KEY", None)
    settings = _settings()
    missing = [
        name
        for name, value in (
            ("TASKAPP_DATABASE_URL", settings.database.url),
            ("TASKAPP_REDIS_URL", settings.redis.url),
            ("TASKAPP_OIDC_ISSUER", settings.oidc.issuer),
        )
        if value is None
    ]
    if missing:
        sys.exit(f"taskapp serve needs {', '.join(missing)} (or use `taskapp run` for development)")
    serve_app(settings, args.host, args.port, args.workers)


def _worker_settings() -> Settings:
    settings = _settings()
    missing = [
        name
        for name, value in (
            ("TASKAPP_DATABASE_URL", settings.database.url),
            ("TASKAPP_BROKER_URL or TASKAPP_REDIS_URL", settings.celery_broker_url),
            ("TASKAPP_SMTP_URL", settings.smtp.url),
        )
        if value is None
    ]
    if missing:
        sys.exit(f"taskapp worker needs {', '.join(missing)}")
    return settings


@contextlib.contextmanager
def _metrics_listener(settings: Settings, *, pool: bool) -> Iterator[None]:
    """With TASKAPP_WORKER_METRICS_PORT, this process serves GET /metrics until it ends.

    `pool`: Celery's pool processes record the values (prefork), so they write them to a
    metrics directory of this worker's own, and a scrape reports their totals. Enter this
    before anything imports prometheus_client: it picks its storage on first import.
    """
    config = settings.worker
    if config.metrics_port is None:
        yield
        return
    if settings.is_production and settings.metrics_token is None:
        sys.exit(
            "taskapp: TASKAPP_WORKER_METRICS_PORT needs TASKAPP_METRICS_TOKEN in production "
            "(the token that may read the metrics)"
        )
    with contextlib.ExitStack() as stack:
        if pool:
            stack.enter_context(_own_metrics_directory())
        from taskapp.observability.metrics_server import start_metrics_server
        from taskapp.observability.scrape import process_registry, scrape_registry

        try:
            server = start_metrics_server(
                config.metrics_host,
                config.metrics_port,
                scrape_registry if pool else process_registry,
                settings.metrics_token,
            )
        except OSError as exc:
            where = f"{config.metrics_host}:{config.metrics_port}"
            sys.exit(f"taskapp: cannot serve metrics on {where}: {exc.strerror or exc}")
        stack.callback(server.close)
        yield


def cmd_worker(args: argparse.Namespace) -> None:
    """Celery worker that sends notification e-mails, with the outbox sweep (beat) inside."""
    settings = _worker_settings()
    with _metrics_listener(settings, pool=True):
        _run_worker(settings, args)


def _run_worker(settings: Settings, args: argparse.Namespace) -> None:
    from taskapp.notifications.jobs import celery

    argv = [
        "worker",
        f"--loglevel={settings.log_level}",
        f"--concurrency={args.concurrency}",
        f"--pool={args.pool}",
        f"--queues={settings.notifications.queue}",
    ]
    if not args.no_beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", f"--schedule={settings.data_dir.resolve() / 'celerybeat-schedule'}"]
    celery.worker_main(argv)


def cmd_beat(args: argparse.Namespace) -> None:
    """Only the outbox sweep scheduler, for deployments that run beat on its own (once)."""
    settings = _worker_settings()
    # Beat records no taskapp metric (the sweep it schedules runs in a worker): its
    # listener reports the process itself, and so that it is up.
    with _metrics_listener(settings, pool=False):
        from taskapp.notifications.jobs import celery

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        schedule = settings.data_dir.resolve() / "celerybeat-schedule"
        celery.start(["beat", f"--loglevel={settings.log_level}", f"--schedule={schedule}"])


def cmd_migrate(args: argparse.Namespace) -> None:
    """Apply all database migrations (alembic upgrade head)."""
    settings = _settings()
    if settings.database.url is None:
        sys.exit("taskapp migrate needs TASKAPP_DATABASE_URL")
    _migrate(settings.database.url.get_secret_value())


def cmd_token(args: argparse.Namespace) -> None:
    """Print an access token signed with the dev key of `taskapp run`."""
    from taskapp.auth.devkey import DEV_ISSUER, load_dev_key, mint_token

    # Checked before anything else, so production gets this answer and not a settings error.
    if EnvironmentSettings().env is Environment.PRODUCTION:
        sys.exit("taskapp token is refused when TASKAPP_ENV=production")
    settings = _settings()
    roles = [role for value in args.roles for role in value.split(",") if role]
    data_dir = settings.data_dir.resolve()
    try:
        key = load_dev_key(data_dir)
    except FileNotFoundError:
        # A key made here would not be the one `taskapp run` trusts.
        sys.exit(
            f"taskapp token: no dev key in {data_dir}; start `taskapp run` first, "
            "or set TASKAPP_DATA_DIR to the directory it uses"
        )
    print(
        mint_token(
            key,
            issuer=DEV_ISSUER,
            audience=settings.oidc.audience,
            subject=args.sub,
            roles=roles,
            email=args.email,
            name=args.name,
            lifetime=args.lifetime,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskapp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help=cmd_run.__doc__)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--workers", type=int, default=2)
    run.set_defaults(func=cmd_run)

    serve = commands.add_parser("serve", help=cmd_serve.__doc__)
    serve.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server's job  # nosec
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help=cmd_worker.__doc__)
    worker.add_argument("--concurrency", type=int, default=2)
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--no-beat", action="store_true", help="run beat separately")
    worker.set_defaults(func=cmd_worker)

    beat = commands.add_parser("beat", help=cmd_beat.__doc__)
    beat.set_defaults(func=cmd_beat)

    migrate = commands.add_parser("migrate", help=cmd_migrate.__doc__)
    migrate.set_defaults(func=cmd_migrate)

    token = commands.add_parser("token", help=cmd_token.__doc__)
    token.add_argument("--sub", required=True, help="subject (the task owner)")
    token.add_argument(
        "--roles", action="append", default=[], help="comma-separated roles, e.g. user or admin"
    )
    token.add_argument("--email")
    token.add_argument("--name")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds")
    token.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
