"""The Lua scripts taskapp runs in Redis, read from the .lua files in `lua/` beside this module,
and what runs them (`Scripts`).

A script may start with libraries (gcra.lua, clock.lua) that define local functions for it:
`source("gcra", "rate_limit")` is the GCRA function followed by the script calling it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

LUA = Path(__file__).with_name("lua")


@cache
def source(*names: str) -> str:
    """The text of the scripts `names`, in order, as one script."""
    return "\n".join((LUA / f"{name}.lua").read_text() for name in names)


class Scripts:
    """Runs Lua scripts (EVALSHA, loading a script the server does not know) on connections
    of their own, beside the client's pool.

    redis-py's pool takes two asyncio locks, checks each connection for unread data and
    awaits its observability hooks on every command: for the one script call of a cached
    read, about as much CPU as the call itself (docs/performance.md). Here a call takes a
    connection from a plain list and gives it back. A connection serves one call at a time;
    one whose call failed or was interrupted (its reply may still be on the way) is closed,
    never reused. A call that finds its idle connection closed by the server (a restart)
    is made once more on a new one, as redis-py's retry would.
    """

    def __init__(self, redis: Redis, *, idle: int = 64) -> None:
        self._pool = redis.connection_pool
        self._idle: list[Connection] = []
        self._max_idle = idle

    def register(self, text: str) -> Script:
        return Script(self, text)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        connection, reused = self._take()
        try:
            try:
                result = await self._command(connection, command)
            except NoScriptError:
                await self._command(connection, ("SCRIPT", "LOAD", script.text))
                result = await self._command(connection, command)
            except (RedisConnectionError, OSError):
                if not reused:
                    raise
                await connection.disconnect(nowait=True)
                connection = self._new()
                result = await self._command(connection, command)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        if len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            await connection.disconnect(nowait=True)
        return result

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.disconnect()

    def _take(self) -> tuple[Connection, bool]:
        if self._idle:
            return self._idle.pop(), True
        return self._new(), False

    def _new(self) -> Connection:
        connection: Connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        return connection

    @staticmethod
    async def _command(connection: Connection, command: tuple[Any, ...]) -> Any:
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
        await connection.send_packed_command(connection.pack_command(*command), check_health=False)
        return await connection.read_response()


class Script:
    """A Lua script run by `Scripts`: `await script(keys=[...], args=[...])`."""

    __slots__ = ("_scripts", "sha", "text")

    def __init__(self, scripts: Scripts, text: str) -> None:
        self._scripts = scripts
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return await self._scripts.run(self, keys, args)
