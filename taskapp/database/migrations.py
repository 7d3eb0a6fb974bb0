"""The schema's migrations (Alembic), applied from code."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent.parent


def alembic_config(database_url: str | None = None) -> Config:
    """The project's Alembic configuration, optionally pointed at `database_url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def upgrade_database(database_url: str | None = None) -> None:
    """`alembic upgrade head` against `database_url` (default: the configured one)."""
    command.upgrade(alembic_config(database_url), "head")
