"""The Lua scripts taskapp runs in Redis, read from the .lua files in `lua/` beside this module,
and what runs them (`Scripts`).

A script may start with libraries (gcra.lua, clock.lua) that define local functions for it:
`source("gcra", "rate_limit")` is the GCRA function followed by the script calling it.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import logging
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError

LUA = Path(__file__).with_name("lua")
logger = logging.getLogger(__name__)


@cache
def source(*names: str) -> str:
    """The text of the scripts `names`, in order, as one script."""
    return "\n".join((LUA / f"{name}.lua").read_text() for name in names)


def _packer(connection: Connection) -> Callable[[tuple[Any, ...]], list[bytes]]:
    """What packs a command as `connection.pack_command` does (its bytes, as a list).

    hiredis packs in C what redis-py packs in Python (~10 µs a script call), byte for byte
    the same for the str, bytes, int and float arguments both accept, UTF-8 text included;
    redis-py's own packing stays for any other text encoding, and for a command name with
    a space in it (which redis-py splits into words).
    """
    encoder = connection.encoder

    def by_redis_py(command: tuple[Any, ...]) -> list[bytes]:
        return connection.pack_command(*command)

    if encoder.encoding.lower().replace("-", "") != "utf8" or encoder.encoding_errors != "strict":
        return by_redis_py

    def pack(command: tuple[Any, ...]) -> list[bytes]:
        name = command[0]
        if not isinstance(name, str) or " " in name:
            return by_redis_py(command)
        try:
            return [hiredis.pack_command(command)]
        except TypeError:  # as redis-py refuses them: None, bool, anything else
            raise DataError(
                f"Invalid input in {command[0]!r}: not bytes, str, int or float"
            ) from None

    return pack


class _Call:
    """A command, packed, waiting for its reply."""

    __slots__ = ("future", "packed")

    def __init__(self, packed: list[bytes], future: asyncio.Future[Any]) -> None:
        self.packed = packed
        self.future = future


class _Link:
    """A connection, and the calls written to it whose replies are due, in order."""

    __slots__ = ("connection", "due", "reader")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.due: collections.deque[_Call] = collections.deque()
        self.reader: asyncio.Task[None] | None = None

    def closed(self) -> bool:
        """The connection was closed, by us or by the server (a restart, its idle timeout):
        calls written to it would be lost."""
        reader, writer = self.connection._reader, self.connection._writer
        if reader is None or writer is None:
            return True
        return reader.at_eof() or writer.transport.is_closing()


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
    - An error reply is its own call's error. A connection that fails (reset, closed, a
      reply later than the client's socket timeout) fails every call waiting on it and is
      dropped; the next call opens another. Nothing is sent twice: a connection found
      closed (by the server while idle, a restart) before a write gets none, and is replaced.
    """

    def __init__(self, redis: Redis) -> None:
        self._pool = redis.connection_pool
        # Encodes commands as the connections would (never connected itself).
        self._packer: Connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._pack = _packer(self._packer)
        self._link: _Link | None = None
        self._opening: asyncio.Task[None] | None = None
        self._queued: list[_Call] = []  # calls for the next write
        self._flush: asyncio.Handle | None = None
        self._closed = False
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
        """Fail the calls waiting, close the connection; later calls fail at once."""
        self._closed = True
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        closed = RedisConnectionError("the script runner is closed")
        self._fail(self._queued, closed)
        self._queued = []
        tasks = [task for task in (self._opening,) if task is not None]
        link, self._link = self._link, None
        if link is not None:
            if link.reader is not None:
                tasks.append(link.reader)
            self._fail(link.due, closed)
            link.due.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._closing, return_exceptions=True)
        if link is not None:
            await link.connection.disconnect(nowait=True)

    async def _call(self, command: tuple[Any, ...]) -> Any:
        """`command`'s reply (or its error), sent with the others of this turn."""
        if self._closed:
            raise RedisConnectionError("the script runner is closed")
        loop = asyncio.get_running_loop()
        # Packed here, so that an argument redis-py cannot encode fails its own call only.
        call = _Call(self._pack(command), loop.create_future())
        self._queued.append(call)
        if self._flush is None:
            self._flush = loop.call_soon(self._write)
        return await call.future

    def _write(self) -> None:
        """Send the calls queued, in one write, on the open connection (opening one if
        there is none: its opening sends them)."""
        self._flush = None
        self._queued = [call for call in self._queued if not call.future.done()]
        if not self._queued or self._closed:
            return
        link = self._link
        if link is not None and link.closed():
            self._drop(link, RedisConnectionError("connection closed by the server"))
            link = None
        if link is None:
            if self._opening is None:
                self._opening = asyncio.create_task(self._open())
            return
        writer = link.connection._writer
        assert writer is not None  # not closed()
        calls, self._queued = self._queued, []
        # Written at once, in order: redis-py's send_packed_command awaits before it writes,
        # and two turns' calls could then leave out of order.
        try:
            writer.writelines([chunk for call in calls for chunk in call.packed])
        except (RuntimeError, OSError) as exc:  # closed under us (uvloop): nothing was sent
            self._drop(link, RedisConnectionError(f"connection lost: {exc}"))
            self._queued = calls + self._queued
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_soon(self._write)
            return
        link.due.extend(calls)
        if link.reader is None:
            link.reader = asyncio.create_task(self._read(link))

    async def _open(self) -> None:
        connection: Connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except Exception as exc:
            self._opening = None
            self._fail(self._queued, exc)
            self._queued = []
            await connection.disconnect(nowait=True)
            return
        except BaseException:
            self._opening = None
            await connection.disconnect(nowait=True)
            raise
        self._opening = None
        if self._closed:
            await connection.disconnect(nowait=True)
            return
        self._link = _Link(connection)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._write)

    async def _read(self, link: _Link) -> None:
        """Hand each reply to its call, while replies are due."""
        connection = link.connection
        try:
            while link.due:
                reply: Any
                try:
                    reply = await connection.read_response(disconnect_on_error=False)
                except ResponseError as error:  # that call's error (NOSCRIPT, a script's)
                    reply = error
                except RedisConnectionError as error:
                    # redis-py raises some error replies as connection errors of their own
                    # kinds (LOADING, NOAUTH): read whole, they are that call's error. A
                    # failed connection raises the plain kind.
                    if type(error) is RedisConnectionError:
                        raise
                    reply = error
                call = link.due.popleft()
                if call.future.done():
                    continue  # its caller gave up
                if isinstance(reply, Exception):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)
        except Exception as exc:  # the connection failed: reset, closed, timed out
            self._drop(link, exc)
        finally:
            link.reader = None

    def _drop(self, link: _Link, exc: Exception) -> None:
        """Forget a failed connection, failing the calls that were waiting on it."""
        if self._link is link:
            self._link = None
        due, link.due = list(link.due), collections.deque()
        self._fail(due, exc)
        task = asyncio.create_task(link.connection.disconnect(nowait=True))
        self._closing.add(task)
        task.add_done_callback(self._disconnected)

    def _disconnected(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("closing a failed Redis connection: %r", task.exception())

    @staticmethod
    def _fail(calls: Iterable[_Call], exc: Exception) -> None:
        for call in calls:
            if not call.future.done():
                # One exception object per caller: each raises it with its own traceback.
                call.future.set_exception(copy.copy(exc))


class Script:
    """A Lua script run by `Scripts`: `await script(keys=[...], args=[...])`."""

    __slots__ = ("_scripts", "sha", "text")

    def __init__(self, scripts: Scripts, text: str) -> None:
        self._scripts = scripts
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def __call__(self, *, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return await self._scripts.run(self, keys, args)
