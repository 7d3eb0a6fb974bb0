"""`taskapp migrate`: apply the schema's migrations."""

from __future__ import annotations

import argparse
import sys

from taskapp.cli.settings import load_settings


def migrate(url: str) -> None:
    """Apply the migrations, or exit with one line saying why they could not be."""
    from sqlalchemy.exc import DBAPIError

    from taskapp.database.migrations import upgrade_database

    try:
        upgrade_database(url)
    except (OSError, DBAPIError) as exc:
        sys.exit(f"taskapp: cannot migrate the database: {exc!r}")


def cmd_migrate(args: argparse.Namespace) -> None:
    """Apply all database migrations (alembic upgrade head)."""
    settings = load_settings()
    if settings.database.url is None:
        sys.exit("taskapp migrate needs TASKAPP_DATABASE_URL")
    migrate(settings.database.url.get_secret_value())
