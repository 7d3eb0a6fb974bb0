"""Lua scripts on connections of their own: loaded when the server does not know them, a
connection reused call after call, replaced when the server closed it, and never reused
after a call that was interrupted (its reply could answer the next call)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from taskapp.redis.client import REDIS_FAILURES
from taskapp.redis.scripts import Scripts

ECHO = "return ARGV[1]"
# Busy in Redis for tens of milliseconds, then answers its argument.
SLOW = "local n = 0 for i = 1, 3000000 do n = n + 1 end return ARGV[1]"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_script_the_server_does_not_know_is_loaded_and_run(redis: Redis):
    scripts = Scripts(redis)
    script = scripts.register(f"return ARGV[1] .. '{uuid.uuid4()}'")
    await redis.script_flush()
    assert not (await redis.script_exists(script.sha))[0]
    assert (await script(args=["x"])).startswith(b"x")
    assert (await redis.script_exists(script.sha))[0]
    await scripts.aclose()


async def test_one_connection_serves_call_after_call(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    for n in range(5):
        assert await echo(keys=["k"], args=[str(n)]) == str(n).encode()
    assert len(scripts._idle) == 1
    await scripts.aclose()
    assert scripts._idle == []


async def test_a_connection_the_server_closed_is_replaced_unnoticed(redis: Redis):
    scripts = Scripts(redis)
    echo = scripts.register(ECHO)
    assert await echo(args=["before"]) == b"before"
    [connection] = scripts._idle
    client_id = await scripts._command(connection, ("CLIENT", "ID"))
    assert await redis.client_kill_filter(_id=client_id) == 1  # that connection only
    await asyncio.sleep(0.1)  # the close reaches the idle connection's socket
    assert str(client_id) not in {client["id"] for client in await redis.client_list()}
    assert await echo(args=["after"]) == b"after"
    assert scripts._idle != [connection]
    await scripts.aclose()


async def test_an_interrupted_call_leaves_no_reply_for_the_next(redis: Redis):
    scripts = Scripts(redis)
    slow = scripts.register(SLOW)
    assert await slow(args=["warm"]) == b"warm"  # loaded, and one idle connection
    [first] = scripts._idle
    call = asyncio.create_task(slow(args=["interrupted"]))
    await asyncio.sleep(0.005)  # sent; Redis is busy with it
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not first.is_connected
    assert await slow(args=["next"]) == b"next"
    assert first not in scripts._idle
    await scripts.aclose()


async def test_redis_down_is_a_redis_failure_and_keeps_no_connection(redis: Redis):
    down = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=1)
    scripts = Scripts(down)
    with pytest.raises(REDIS_FAILURES) as raised:
        await scripts.register(ECHO)(args=["x"])
    assert isinstance(raised.value, RedisConnectionError | OSError)
    assert scripts._idle == []
    await down.aclose()


async def test_a_server_that_never_answers_costs_one_socket_timeout():
    """The client's socket timeout bounds each step of a call (connect, send, reply)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    frozen = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
    scripts = Scripts(frozen)
    started = asyncio.get_running_loop().time()
    with pytest.raises(REDIS_FAILURES):
        await scripts.register(ECHO)(args=["x"])
    assert asyncio.get_running_loop().time() - started < 1.5
    assert scripts._idle == []
    await frozen.aclose()
    server.close()
