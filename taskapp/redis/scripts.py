"""The Lua scripts taskapp runs in Redis, read from the .lua files in `lua/` beside this module.

A script may start with libraries (gcra.lua, clock.lua) that define local functions for it:
`source("gcra", "rate_limit")` is the GCRA function followed by the script calling it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

LUA = Path(__file__).with_name("lua")


@cache
def source(*names: str) -> str:
    """The text of the scripts `names`, in order, as one script."""
    return "\n".join((LUA / f"{name}.lua").read_text() for name in names)
