"""The `taskapp` command: run | serve | worker | beat | migrate | token."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from taskapp.cli.migrate import cmd_migrate
from taskapp.cli.run import cmd_run
from taskapp.cli.serve import cmd_serve
from taskapp.cli.token import cmd_token
from taskapp.cli.worker import cmd_beat, cmd_worker


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
