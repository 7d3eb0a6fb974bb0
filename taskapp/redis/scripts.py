"""The Lua scripts taskapp runs in Redis, read from the .lua files in `lua/` beside this module,
and what runs them (`Scripts`).

A script may start with libraries (gcra.lua, clock.lua) that define local functions for it:
`source("gcra", "rate_limit")` is the GCRA function followed by the script calling it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

LUA = Path(__file__).with_name("lua")


@cache
def source(*names: str) -> str:
    """The text of the scripts `names`, in order, as one script."""
    return "\n".join((LUA / f"{name}.lua").read_text() for name in names)


class _Call:
    """A command waiting for its reply."""

    __slots__ = ("command", "future", "retried")

    def __init__(self, command: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
        self.command = command
        self.future = future
        self.retried = False


class _Link:
    """A connection, and the calls written to it whose replies are due, in order."""

    __slots__ = ("connection", "due", "reader")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.due: collections.deque[_Call] = collections.deque()
        self.reader: asyncio.Task[None] | None = None


class Scripts:
    """Runs Lua scripts (EVALSHA; a script the server does not know is loaded, then run)
    pipelined on one connection of their own per process.

    Every request makes one or two script calls. Through redis-py's pool each costs about as
    much client CPU as the call itself (two locks, a readiness check, observability hooks),
    and a connection per call costs a system call to send and a wake-up to read per call.
    Here the calls made in one turn of the event loop leave in one write, and one reader
    hands the replies, which Redis sends in order, to their callers (docs/performance.md).

    - A caller that gives up (its timeout, a cancelled request) leaves its reply to be read
      and dropped: the connection stays in step. A call given up before it was sent is not
      sent.
    - A connection that fails fails the calls waiting on it with that error and is dropped;
      the next call opens another. A call lost with a connection that was closed or reset
      (Redis restarted, or closed it while idle) is made once more on a new one, as
      redis-py's own retry would; one that timed out is not.
    - The client's socket timeouts bound connecting and each wait for a reply.
    """

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        self._link: _Link | None = None
        self._opening: asyncio.Task[None] | None = None
        self._queued: list[_Call] = []  # calls for the next write
        self._flush: asyncio.Handle | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def register(self, text: str) -> Script:
        return Script(self, text)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._call(command)
        except NoScriptError:
            await self._call(("SCRIPT", "LOAD", script.text))
            return await self._call(command)

    async def aclose(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._opening is not None:
            self._opening.cancel()
        link, self._link = self._link, None
        if link is not None:
            if link.reader is not None:
                link.reader.cancel()
            self._fail(link.due, RedisConnectionError("closed"))
            await link.connection.disconnect()
        self._fail(self._queued, RedisConnectionError("closed"))
        self._queued = []
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _call(self, command: tuple[Any, ...]) -> Any:
        """`command`'s reply (or its error), sent with the others of this turn."""
        call = _Call(command, asyncio.get_running_loop().create_future())
        self._queue(call)
        return await call.future

    def _queue(self, call: _Call) -> None:
        self._queued.append(call)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        """Send the calls queued, in one write, on the open connection (opening one if
        there is none; its opening sends them)."""
        self._flush = None
        link = self._link
        writer = link.connection._writer if link is not None else None
        if link is None or writer is None:
            if link is not None:
                self._drop(link, RedisConnectionError("connection closed"))
            if self._opening is None:
                self._opening = asyncio.create_task(self._open())
            return
        calls = [call for call in self._queued if not call.future.done()]
        self._queued = []
        if not calls:
            return
        connection = link.connection
        packed: list[bytes] = []
        for call in calls:
            packed.extend(connection.pack_command(*call.command))
        link.due.extend(calls)
        # Written at once, in order: redis-py's send_packed_command would await before
        # writing, and two batches could then leave out of order.
        writer.writelines(packed)
        if link.reader is None:
            link.reader = asyncio.create_task(self._read(link))

    async def _open(self) -> None:
        try:
            connection: Connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await connection.disconnect(nowait=True)
                raise
        except Exception as exc:
            self._fail(self._queued, exc)
            self._queued = []
            return
        finally:
            self._opening = None
        self._link = _Link(connection)
        self._write()

    async def _read(self, link: _Link) -> None:
        """Hand each reply to its call, while replies are due."""
        connection = link.connection
        try:
            while link.due:
                try:
                    reply = await connection.read_response(disconnect_on_error=False)
                except ResponseError as error:  # that call's error (NOSCRIPT, a script's)
                    reply = error
                call = link.due.popleft()
                if call.future.done():
                    continue  # its caller gave up
                if isinstance(reply, ResponseError):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)
        except Exception as exc:  # the connection failed: refused, reset, closed, timed out
            self._drop(link, exc)
        finally:
            link.reader = None

    def _drop(self, link: _Link, exc: Exception) -> None:
        """Forget a failed connection: its calls fail, or are made again once if the
        connection was closed under them."""
        if self._link is link:
            self._link = None
        due, link.due = list(link.due), collections.deque()
        closed = isinstance(exc, RedisConnectionError | ConnectionError)
        again = [c for c in due if closed and not c.retried and not c.future.done()]
        self._fail([c for c in due if c not in again], exc)
        for call in again:
            call.retried = True
            self._queue(call)
        task = asyncio.create_task(link.connection.disconnect(nowait=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    def _fail(calls: Sequence[_Call] | collections.deque[_Call], exc: Exception) -> None:
        for call in calls:
            if not call.future.done():
                call.future.set_exception(exc)


class Script:
    """A Lua script run by `Scripts`: `await script(keys=[...], args=[...])`."""

    __slots__ = ("_scripts", "sha", "text")

    def __init__(self, scripts: Scripts, text: str) -> None:
        self._scripts = scripts
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return await self._scripts.run(self, keys, args)
