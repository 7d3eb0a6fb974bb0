"""Settings as the commands read them: validated, or a readable list of what is wrong."""

from __future__ import annotations

import sys

from pydantic import ValidationError

from taskapp.config import Settings


def load_settings() -> Settings:
    """Settings from the environment, or a readable list of what is wrong, then exit."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            lines.append(f"  - {where}: {error['msg']}")
        sys.exit("taskapp: invalid configuration:\n" + "\n".join(lines))


def missing_settings(**values: object) -> str:
    """The names of the settings among `values` (by variable name) that are not set."""
    return ", ".join(name for name, value in values.items() if value is None)
