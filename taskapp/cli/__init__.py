"""The `taskapp` command: run | serve | worker | beat | migrate | token."""

from taskapp.cli.parser import main

__all__ = ["main"]
