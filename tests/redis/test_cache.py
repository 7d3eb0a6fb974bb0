"""The response cache: hits skip the database, every write is visible at once, Redis faults
fall back to the database, and nothing cached before a lost invalidation is served again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import insert, text

from taskapp.app import create_app
from taskapp.membership.models import inbox_id
from taskapp.redis.cache import STORE_DELAY
from taskapp.tasks.models import Task
from testing.oidc import OIDCProvider
from testing.services import private_redis
from tests.conftest import SettingsFactory, app_state, running
from tests.fixtures.commands import sent_redis_commands
from tests.fixtures.metrics import sample
from tests.fixtures.tasks import create, task_queries


def hits() -> float:
    return sample("taskapp_cache_requests_total", result="hit")


async def test_second_read_is_a_hit_without_database_work(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider
):
    alice = oidc.auth("alice")
    task = await create(client, alice, title="cached")
    first_list = await client.get("/tasks", headers=alice)
    first_item = await client.get(f"/tasks/{task['id']}", headers=alice)
    before = hits()
    with task_queries(app) as statements:
        second_list = await client.get("/tasks", headers=alice)
        second_item = await client.get(f"/tasks/{task['id']}", headers=alice)
    assert statements == []
    assert hits() == before + 2
    assert second_list.content == first_list.content
    assert second_item.content == first_item.content
    assert second_list.headers["content-type"] == "application/json"


async def test_every_write_is_visible_to_the_next_read(
    client: httpx.AsyncClient, oidc: OIDCProvider
):
    alice, admin = oidc.auth("alice"), oidc.auth("root", roles=["admin"])
    task = await create(client, alice, title="v1")
    for headers in (alice, admin):  # warm both views
        await client.get("/tasks", headers=headers)
        await client.get(f"/tasks/{task['id']}", headers=headers)

    await client.patch(f"/tasks/{task['id']}", json={"title": "v2"}, headers=alice)
    for headers in (alice, admin):
        assert (await client.get(f"/tasks/{task['id']}", headers=headers)).json()["title"] == "v2"
        assert (await client.get("/tasks", headers=headers)).json()["items"][0]["title"] == "v2"

    # An admin's change to alice's task reaches alice's view too.
    await client.patch(f"/tasks/{task['id']}", json={"status": "completed"}, headers=admin)
    assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()["status"] == "completed"

    second = await create(client, alice, title="second")
    for headers in (alice, admin):
        listed = (await client.get("/tasks", headers=headers)).json()
        assert listed["total"] == 2
        assert listed["items"][0]["id"] == second["id"]

    assert (await client.delete(f"/tasks/{task['id']}", headers=admin)).status_code == 204
    for headers in (alice, admin):
        assert (await client.get(f"/tasks/{task['id']}", headers=headers)).status_code == 404
        assert (await client.get("/tasks", headers=headers)).json()["total"] == 1


async def test_cached_pages_never_cross_users(client: httpx.AsyncClient, oidc: OIDCProvider):
    alice, bob = oidc.auth("alice"), oidc.auth("bob")
    await create(client, alice, title="alice's")
    await create(client, bob, title="bob's")
    for _ in range(2):  # miss, then hit
        for headers, title in ((alice, "alice's"), (bob, "bob's")):
            body = (await client.get("/tasks", headers=headers)).json()
            assert [item["title"] for item in body["items"]] == [title]
    # An admin's page with the same parameters is the admin view, not a user's.
    admin = (await client.get("/tasks", headers=oidc.auth("root", roles=["admin"]))).json()
    assert admin["total"] == 2
    filtered = await client.get(
        "/tasks", params={"owner": "bob"}, headers=oidc.auth("root", roles=["admin"])
    )
    assert [item["title"] for item in filtered.json()["items"]] == ["bob's"]


async def test_entries_expire_after_the_ttl(make_settings: SettingsFactory, oidc: OIDCProvider):
    app = create_app(make_settings(cache={"ttl": 1}))
    async with running(app) as client:
        alice = oidc.auth(f"ttl-{uuid.uuid4()}")
        assert (await client.get("/tasks", headers=alice)).json()["total"] == 0
        # A change made behind the API's back is only seen once the entry expires.
        async with app_state(app).engine.begin() as connection:
            await connection.execute(
                insert(Task).values(
                    owner=(subject := alice_subject(alice, oidc)),
                    id=uuid.uuid4(),
                    project_id=inbox_id(subject),
                    created_by=subject,
                    title="direct",
                )
            )
        assert (await client.get("/tasks", headers=alice)).json()["total"] == 0
        await asyncio.sleep(1.2)
        assert (await client.get("/tasks", headers=alice)).json()["total"] == 1
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))


def alice_subject(headers: dict[str, str], oidc: OIDCProvider) -> str:
    import jwt

    token = headers["Authorization"].split()[1]
    return str(jwt.decode(token, options={"verify_signature": False})["sub"])


async def test_concurrent_misses_load_once(make_settings: SettingsFactory, oidc: OIDCProvider):
    # Redis calls get seconds, not the default 0.2 s: on a busy machine a slow answer would
    # trip the breaker, and the requests would rightly go to the database.
    app = create_app(make_settings(cache={"timeout": 5}, ratelimit={"timeout": 5}))
    alice = oidc.auth(f"single-flight-{uuid.uuid4()}")
    async with running(app) as client:
        await create(client, alice, title="x")
        with task_queries(app) as statements:
            responses = await asyncio.gather(
                *(client.get("/tasks", headers=alice) for _ in range(20))
            )
        async with app_state(app).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert len([s for s in statements if "page_keys" in s]) == 1  # one page read


async def test_concurrent_misses_in_two_processes_load_once(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    """Two app instances sharing Redis: the fill lock makes the second wait, not load."""
    shared = {"key_prefix": f"test-{uuid.uuid4().hex}:"}
    first = create_app(make_settings(redis=shared))
    second = create_app(make_settings(redis=shared))
    alice = oidc.auth(f"pair-{uuid.uuid4()}")
    async with running(first) as one, running(second) as two:
        await one.get("/tasks", headers=alice)  # warm the JWKS caches and pools
        await two.get("/tasks", headers=alice)
        await one.post("/tasks", json={"title": "x"}, headers=alice)  # new generation
        with task_queries(first) as q1, task_queries(second) as q2:
            a, b = await asyncio.gather(
                one.get("/tasks", headers=alice), two.get("/tasks", headers=alice)
            )
        assert a.content == b.content
        assert len([s for s in q1 + q2 if "page_keys" in s]) == 1
        async with app_state(first).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))


@contextlib.asynccontextmanager
async def app_on(
    make_settings: SettingsFactory, url: str, **redis: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(
        make_settings(
            redis={"url": url, **redis},
            cache={"retry_interval": 0.5},
            ratelimit={"retry_interval": 0.5},
        )
    )
    async with running(app) as client:
        yield app, client
    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks"))


@pytest.mark.slow
async def test_redis_stopped_and_restarted(
    make_settings: SettingsFactory, oidc: OIDCProvider, tmp_path: Path
):
    alice = oidc.auth("alice")
    with private_redis(tmp_path / "redis") as server:
        async with app_on(make_settings, server.url) as (_, client):
            task = await create(client, alice, title="before")
            await client.get("/tasks", headers=alice)

            server.stop()
            errors = sample("taskapp_cache_errors_total", operation="lookup")
            started = time.monotonic()
            assert (await client.get("/tasks", headers=alice)).json()["total"] == 1
            patched = await client.patch(
                f"/tasks/{task['id']}", json={"title": "during"}, headers=alice
            )
            assert patched.status_code == 200
            during = await create(client, alice, title="during outage")
            listed = (await client.get("/tasks", headers=alice)).json()
            assert listed["total"] == 2
            assert {item["title"] for item in listed["items"]} == {"during", "during outage"}
            assert time.monotonic() - started < 2
            assert sample("taskapp_cache_errors_total", operation="lookup") > errors

            server.start()
            await asyncio.sleep(0.6)  # past retry_interval
            before = hits()
            for _ in range(3):
                got = await client.get(f"/tasks/{during['id']}", headers=alice)
                assert got.json()["title"] == "during outage"
            assert hits() >= before + 2  # caching resumed


async def test_unresponsive_redis_does_not_slow_requests(
    make_settings: SettingsFactory, oidc: OIDCProvider, tmp_path: Path
):
    """Redis accepts connections but answers nothing (frozen): requests pay at most the
    cache timeout once, then bypass the cache."""
    alice = oidc.auth("alice")
    with private_redis(tmp_path / "redis") as server:
        async with app_on(make_settings, server.url) as (_, client):
            await create(client, alice, title="x")
            await client.get("/tasks", headers=alice)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                timings = []
                for _ in range(5):
                    started = time.monotonic()
                    response = await client.get("/tasks", headers=alice)
                    timings.append(time.monotonic() - started)
                    assert response.status_code == 200
                    assert response.json()["total"] == 1
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert max(timings) < 0.6, timings  # the 0.2 s cache timeout, not a hang
            assert sum(timings) < 1.0, timings  # bypassed after the first timeout


async def test_invalidation_lost_during_an_outage_is_never_served_stale(
    make_settings: SettingsFactory, oidc: OIDCProvider, tmp_path: Path
):
    """Redis freezes (keeping its data) just as a write commits: the generation bump is lost.
    Once Redis answers again, no process may serve what was cached before that write."""
    alice = oidc.auth("alice")
    with private_redis(tmp_path / "redis") as server:
        shared = {"key_prefix": f"test-{uuid.uuid4().hex}:"}
        async with (
            app_on(make_settings, server.url, **shared) as (writer, one),
            app_on(make_settings, server.url, **shared) as (_, two),
        ):
            task = await create(one, alice, title="old")
            for client in (one, two):  # both processes now hold "old" in the cache
                assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()[
                    "title"
                ] == "old"

            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                patched = await one.patch(
                    f"/tasks/{task['id']}", json={"title": "new"}, headers=alice
                )
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert patched.status_code == 200

            deadline = time.monotonic() + 5
            while app_state(writer).cache._lost_invalidation:  # the epoch bump is retried
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for client in (two, one):
                got = await client.get(f"/tasks/{task['id']}", headers=alice)
                assert got.json()["title"] == "new"


async def test_waiters_load_themselves_when_the_loading_request_is_cancelled(
    app: FastAPI,
):
    cache = app_state(app).cache
    loads: list[str] = []

    async def slow_load(_written_at: float, _version: str | None) -> bytes:
        loads.append("leader")
        await asyncio.sleep(5)
        return b"never"

    async def quick_load(_written_at: float, _version: str | None) -> bytes:
        loads.append("waiter")
        return b"fresh"

    scope, key = f"owner:{uuid.uuid4()}", "list:1"
    leader = asyncio.create_task(cache.get_or_load(scope, key, slow_load))
    await asyncio.sleep(0.1)  # the leader holds the single-flight slot
    waiter = asyncio.create_task(cache.get_or_load(scope, key, quick_load))
    await asyncio.sleep(0.05)
    leader.cancel()  # e.g. its client went away
    assert await asyncio.wait_for(waiter, 2) == b"fresh"
    assert loads == ["leader", "waiter"]
    with contextlib.suppress(asyncio.CancelledError):
        await leader


async def test_the_lock_holder_loads_even_when_a_local_waiter_was_first(app: FastAPI):
    """Two misses in one process whose lookups return out of order: the one that holds the
    fill lock must load at once, not wait on the local waiter that waits for the lock."""
    from taskapp.redis.cache import _Fill

    cache = app_state(app).cache
    loads: list[str] = []

    async def load() -> bytes:
        loads.append("load")
        return b"value"

    entry_key = f"{cache._prefix}out-of-order:{uuid.uuid4()}"
    token = uuid.uuid4().hex
    await cache._redis.set(entry_key + ":lock", token, px=2000)  # the holder's claim
    started = time.monotonic()
    waiter = asyncio.create_task(cache._single_flight(_Fill(entry_key, "other", False), load))
    await asyncio.sleep(0.02)  # the waiter is the local leader now, polling for the entry
    holder = await cache._single_flight(_Fill(entry_key, token, True), load)
    assert holder == b"value"
    assert await asyncio.wait_for(waiter, 1) == b"value"
    assert time.monotonic() - started < 0.3  # not the 500 ms lock wait
    assert loads == ["load"]
    assert await cache._redis.get(entry_key + ":lock") is None  # released by the store


async def test_a_failed_load_releases_the_fill_lock(client: httpx.AsyncClient, app: FastAPI, oidc):
    """A miss that ends in 404 must not leave others waiting on its lock."""
    alice = oidc.auth("alice")
    task_id = uuid.uuid4()
    missing = f"/tasks/{task_id}"
    assert (await client.get(missing, headers=alice)).status_code == 404
    pattern = f"{app_state(app).cache._prefix}*task:{task_id}:lock"
    assert [key async for key in app_state(app).cache._redis.scan_iter(match=pattern)] == []
    started = time.monotonic()
    assert (await client.get(missing, headers=alice)).status_code == 404
    assert time.monotonic() - started < 0.3


async def test_a_loaded_entry_rides_with_the_next_lookup(
    client: httpx.AsyncClient, app: FastAPI, oidc: OIDCProvider, monkeypatch: pytest.MonkeyPatch
):
    """The store of a miss costs no round trip of its own when another lookup follows."""
    alice = oidc.auth("alice")
    task = await create(client, alice, title="carried")
    sent = sent_redis_commands(monkeypatch, app_state(app))
    await app_state(app).cache.clear()  # the reads must reach the database
    sent.clear()
    with task_queries(app) as statements:
        missed = await client.get(f"/tasks/{task['id']}", headers=alice)
        hit = await client.get(f"/tasks/{task['id']}", headers=alice)
    assert sent == ["EVALSHA", "EVALSHA"]  # two lookups; the first one's store in the second
    assert len(statements) == 1
    assert hit.content == missed.content


async def test_a_loaded_entry_is_stored_soon_without_another_lookup(
    make_settings: SettingsFactory, oidc: OIDCProvider
):
    """With no lookup to carry it, the entry reaches Redis (for every instance) on its own,
    and its fill lock is released."""
    shared = {"key_prefix": f"test-{uuid.uuid4().hex}:"}
    first = create_app(make_settings(redis=shared))
    second = create_app(make_settings(redis=shared))
    alice = oidc.auth(f"solo-{uuid.uuid4()}")
    async with running(first) as one, running(second) as two:
        task = await create(one, alice, title="alone")
        loaded = await one.get(f"/tasks/{task['id']}", headers=alice)
        await asyncio.sleep(STORE_DELAY + 0.05)
        redis = app_state(first).cache._redis
        pattern = f"{app_state(first).cache._prefix}*task:{task['id']}"
        assert len([key async for key in redis.scan_iter(match=pattern)]) == 1
        assert [key async for key in redis.scan_iter(match=pattern + ":lock")] == []
        with task_queries(second) as statements:
            elsewhere = await two.get(f"/tasks/{task['id']}", headers=alice)
        assert statements == []
        assert elsewhere.content == loaded.content
        async with app_state(first).engine.begin() as connection:
            await connection.execute(text("TRUNCATE tasks"))


async def test_values_kept_in_the_process_by_version_and_last_kept(app: FastAPI):
    """`local` answers only for the version a value was kept at; `last_local` whatever the
    version since (a guess); `forget_local` and `clear` drop them."""
    cache = app_state(app).cache
    cache.keep_local("owner:alice", "1:1", "scope", "first")
    assert cache.local("owner:alice", "1:1", "scope") == "first"
    assert cache.local("owner:alice", "1:2", "scope") is None  # the view changed since
    assert cache.local("owner:alice", None, "scope") is None  # no version: the cache is off
    assert cache.last_local("owner:alice", "scope") == "first"
    assert cache.last_local("owner:bob", "scope") is None
    cache.keep_local("owner:alice", None, "scope", "unversioned")  # not kept
    assert cache.last_local("owner:alice", "scope") == "first"
    cache.forget_local("owner:alice", "scope")
    assert cache.last_local("owner:alice", "scope") is None
    cache.keep_local("owner:bob", "1:1", "scope", "his")
    await cache.clear()
    assert cache.last_local("owner:bob", "scope") is None
