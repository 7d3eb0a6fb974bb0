"""Lua scripts pipelined on one connection of their own: loaded when the server does not know
them, the calls of one turn in one write with each reply to its caller, a connection the
server closed replaced unnoticed, and a call given up leaving no reply for the next."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

from taskapp.redis.client import REDIS_FAILURES
from taskapp.redis.scripts import Scripts, _packer

ECHO = "return ARGV[1]"
# Busy in Redis for tens of milliseconds, then answers its argument.
SLOW = "local n = 0 for i = 1, 3000000 do n = n + 1 end return ARGV[1]"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def count_writes(scripts: Scripts) -> list[int]:
    """The number of commands in each write `scripts` makes from now on."""
    writes: list[int] = []
    write = scripts._write

    def counting() -> None:
        before = {id(call) for call in (scripts._link.due if scripts._link else ())}
        write()
        if scripts._link is not None:
            writes.append(sum(1 for call in scripts._link.due if id(call) not in before))

    scripts._write = counting  # type: ignore[method-assign]
    return writes


async def test_a_script_the_server_does_not_know_is_loaded_and_run(redis: Redis):
    scripts = Scripts(redis)
    script = scripts.register(f"return ARGV[1] .. '{uuid.uuid4()}'")
    await redis.script_flush()
    assert not (await redis.script_exists(script.sha))[0]
    assert (await script(args=["x"])).startswith(b"x")
    assert (await redis.script_exists(script.sha))[0]
    await scripts.aclose()


async def test_calls_of_one_turn_leave_in_one_write_and_each_gets_its_reply(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    assert await echo(args=["warm"]) == b"warm"  # loaded, connected
    writes = count_writes(scripts)
    replies = await asyncio.gather(*(echo(keys=["k"], args=[str(n)]) for n in range(50)))
    assert replies == [str(n).encode() for n in range(50)]
    assert writes == [50]
    # One connection for all of them, kept for the next calls.
    link = scripts._link
    assert link is not None
    for n in range(3):
        assert await echo(args=[f"again {n}"]) == f"again {n}".encode()
    assert scripts._link is link
    await scripts.aclose()


async def test_an_error_reply_fails_only_its_own_call(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    broken = scripts.register("return redis.call('INCR')")  # wrong number of arguments
    results = await asyncio.gather(
        echo(args=["a"]), broken(), echo(args=["b"]), return_exceptions=True
    )
    assert results[0] == b"a"
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"b"
    await scripts.aclose()


async def test_a_connection_the_server_closed_is_replaced_unnoticed(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    assert await echo(args=["before"]) == b"before"
    link = scripts._link
    client_id = await scripts._call(("CLIENT", "ID"))
    assert await redis.client_kill_filter(_id=client_id) == 1  # that connection only
    await asyncio.sleep(0.1)  # the close reaches the idle connection's socket
    assert str(client_id) not in {client["id"] for client in await redis.client_list()}
    replies = await asyncio.gather(echo(args=["after"]), echo(args=["and after"]))
    assert list(replies) == [b"after", b"and after"]
    assert scripts._link is not link
    await scripts.aclose()


async def test_a_call_given_up_leaves_no_reply_for_the_next(redis: Redis):
    scripts = Scripts(redis)
    slow = scripts.register(SLOW)
    assert await slow(args=["warm"]) == b"warm"
    link = scripts._link
    call = asyncio.create_task(slow(args=["given up"]))
    await asyncio.sleep(0.005)  # sent; Redis is busy with it
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await slow(args=["next"]) == b"next"
    # Its reply was read and dropped: the connection stayed in step, and stays.
    assert scripts._link is link
    await scripts.aclose()


async def test_a_call_given_up_before_it_left_is_not_sent(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    assert await echo(args=["warm"]) == b"warm"
    writes = count_writes(scripts)
    call = asyncio.create_task(echo(args=["never"]))
    await asyncio.sleep(0)  # queued, not yet written
    call.cancel()
    results = await asyncio.gather(call, echo(args=["sent"]), return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1] == b"sent"
    assert sum(writes) == 1
    await scripts.aclose()


async def test_redis_down_is_a_redis_failure_and_keeps_no_connection(redis: Redis):
    down = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1)
    scripts = Scripts(down)
    results = await asyncio.gather(
        *(scripts.register(ECHO)(args=[str(n)]) for n in range(3)), return_exceptions=True
    )
    for result in results:
        assert isinstance(result, REDIS_FAILURES)
        assert isinstance(result, RedisConnectionError | OSError)
    assert scripts._link is None
    await down.aclose()


@pytest.mark.parametrize("answers_the_handshake", [False, True])
async def test_a_server_that_never_answers_costs_one_socket_timeout(answers_the_handshake: bool):
    """The client's socket timeout bounds connecting and each wait for a reply."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):  # accepts, reads, answers nothing but...
            if answers_the_handshake:  # ...redis-py's CLIENT SETINFO at connect
                writer.write(b"+OK\r\n" * data.count(b"SETINFO"))

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frozen = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
    scripts = Scripts(frozen)
    started = asyncio.get_running_loop().time()
    with pytest.raises(REDIS_FAILURES):
        await scripts.register(ECHO)(args=["x"])
    assert asyncio.get_running_loop().time() - started < 1.5
    assert scripts._link is None
    await scripts.aclose()
    await frozen.aclose()
    server.close()


async def test_closing_fails_the_calls_still_waiting_and_those_after(redis: Redis):
    scripts = Scripts(redis)
    slow = scripts.register(SLOW)
    assert await slow(args=["warm"]) == b"warm"
    call = asyncio.create_task(slow(args=["waiting"]))
    await asyncio.sleep(0.005)
    await scripts.aclose()
    with pytest.raises(RedisConnectionError):
        await call
    with pytest.raises(RedisConnectionError):
        await slow(args=["after"])
    assert scripts._link is None


async def test_an_argument_redis_cannot_take_fails_its_own_call_only(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    results = await asyncio.gather(
        echo(args=["ok"]), echo(args=[None]), echo(args=["ok too"]), return_exceptions=True
    )
    assert results[0] == b"ok"
    assert isinstance(results[1], DataError)
    assert results[2] == b"ok too"
    await scripts.aclose()


async def test_an_error_reply_of_the_connection_kind_is_that_calls_own(redis: Redis):
    """redis-py raises some error replies (LOADING, NOAUTH, max clients) as connection
    errors: the one call fails, the connection and the calls behind it do not."""
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    loading = scripts.register("return redis.error_reply('LOADING Redis is loading')")
    await redis.script_load(ECHO)  # all three in one write, none first sent as a load
    await redis.script_load(loading.text)
    results = await asyncio.gather(echo(args=["a"]), loading(), echo(args=["b"]),
                                   return_exceptions=True)  # fmt: skip
    assert results[0] == b"a"
    assert isinstance(results[1], REDIS_FAILURES)
    assert results[2] == b"b"
    await scripts.aclose()


async def test_a_write_refused_by_a_closed_transport_is_made_on_a_new_connection(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
):
    """uvloop refuses to write to a transport closed under it (Redis went away between
    turns): nothing was sent, so the calls go out on the next connection."""
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    assert await echo(args=["warm"]) == b"warm"
    link = scripts._link
    assert link is not None
    writer = link.connection._writer
    assert writer is not None

    def refuse(data: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    monkeypatch.setattr(writer, "writelines", refuse)
    replies = await asyncio.gather(echo(args=["a"]), echo(args=["b"]))
    assert list(replies) == [b"a", b"b"]
    assert scripts._link is not link
    await scripts.aclose()


def _unconnected(**options: Any) -> Connection:
    connection: Connection = Redis(**options).connection_pool.make_connection()  # type: ignore[no-untyped-call]
    return connection


@settings(max_examples=500, deadline=None)
@given(
    arguments=st.lists(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]))
        | st.binary()
        | st.integers()
        | st.floats(allow_nan=True, allow_infinity=True),
        max_size=8,
    )
)
def test_commands_are_packed_as_redis_py_packs_them(arguments: list[Any]) -> None:
    connection = _unconnected()
    command = ("EVALSHA", "0" * 40, len(arguments), *arguments)
    assert _packer(connection)(command) == [b"".join(connection.pack_command(*command))]


@pytest.mark.parametrize("argument", [None, True, [1], {"a": 1}])
def test_what_redis_py_refuses_to_pack_is_refused(argument: Any) -> None:
    connection = _unconnected()
    with pytest.raises(DataError):
        connection.pack_command("SET", "key", argument)
    with pytest.raises(DataError):
        _packer(connection)(("SET", "key", argument))


@pytest.mark.parametrize(
    "command",
    [("SCRIPT LOAD", "return 1"), (b"SCRIPT LOAD", "return 1"), (b"EVALSHA", "0" * 40, 0)],
)
def test_a_name_redis_py_splits_or_takes_as_bytes_is_packed_as_it_does(
    command: tuple[Any, ...],
) -> None:
    """redis-py splits a name with a space in it into words; hiredis would not."""
    connection = _unconnected()
    assert b"".join(_packer(connection)(command)) == b"".join(connection.pack_command(*command))


def test_another_text_encoding_is_packed_by_redis_py() -> None:
    connection = _unconnected(encoding="latin-1")
    assert _packer(connection)(("SET", "k", "é")) == connection.pack_command("SET", "k", "é")
    assert connection.pack_command("SET", "k", "é")[0].endswith(b"\xe9\r\n")
