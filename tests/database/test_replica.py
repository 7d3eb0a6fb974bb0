"""Reads from a real streaming standby (`TASKAPP_DATABASE_REPLICA_URL`): which reads it
serves, that a client always reads its own writes, and the primary taking over when the
standby is down or behind. Rows written straight into the primary (not through the API, so
no write time is recorded) show which server answered: only the primary has them while the
standby's replay is paused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi import FastAPI

from taskapp.app import create_app
from taskapp.database.migrations import upgrade_database
from taskapp.membership.models import inbox_id
from taskapp.redis.cache import ResponseCache, _view_id
from testing.oidc import OIDCProvider
from testing.polling import eventually
from testing.standby import StreamingPair, streaming_pair
from tests.conftest import SettingsFactory, app_state, running
from tests.fixtures.metrics import sample

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(scope="module")
def pair() -> Iterator[StreamingPair]:
    with streaming_pair() as started:
        upgrade_database(started.primary.url)
        yield started


@pytest.fixture
async def streaming(pair: StreamingPair) -> AsyncIterator[StreamingPair]:
    """The pair, replaying and running again after each test, whatever the test did."""
    yield pair
    if not pair.standby.running:
        pair.standby.start()
    await pair.resume_replay()
    await pair.caught_up()


def _app(
    make_settings: SettingsFactory,
    pair: StreamingPair,
    redis: dict[str, Any] | None = None,
    **database: Any,
) -> FastAPI:
    settings = make_settings(
        database={
            "url": pair.primary.url,
            "replica_url": pair.standby.url,
            "replica_check_interval": 0.05,
            **database,
        },
        redis=redis,
    )
    return create_app(settings)


def _reads(server: str) -> float:
    return sample("db_reads_total", server=server)


async def _serving(app: FastAPI) -> None:
    """Wait until the replica serves reads of everything written before now."""
    replica = app_state(app).replica
    assert replica is not None
    seconds, microseconds = await app_state(app).redis.time()
    now = seconds * 1_000_000 + microseconds

    async def serving() -> bool:
        return replica.serves(now)

    await eventually(serving, "the replica to serve reads", 5, 0.02)


async def _insert_behind_the_api(pair: StreamingPair, owner: str, title: str) -> str:
    task_id = str(uuid.uuid4())
    await pair.primary.execute(
        "INSERT INTO tasks (id, owner, project_id, created_by, title, description, status) "
        "VALUES ($1::uuid, $2, $3, $2, $4, '', 'pending')",
        task_id,
        owner,
        inbox_id(owner),
        title,
    )
    return task_id


async def test_reads_go_to_the_replica(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    alice = oidc.auth(owner)
    app = _app(make_settings, streaming)
    async with running(app) as client:
        created = await client.post("/tasks", json={"title": "through the api"}, headers=alice)
        assert created.status_code == 201
        await streaming.caught_up()
        await _serving(app)
        await streaming.pause_replay()
        hidden = await _insert_behind_the_api(streaming, owner, "only on the primary")
        # Written after the standby stopped replaying, and unknown to the API: a read that
        # shows it was answered by the primary.
        replica_reads = _reads("replica")

        listed = await client.get("/tasks", headers=alice)
        assert listed.status_code == 200
        assert [t["title"] for t in listed.json()["items"]] == ["through the api"]
        assert (await client.get(f"/tasks/{hidden}", headers=alice)).status_code == 404
        got = await client.get(f"/tasks/{created.json()['id']}", headers=alice)
        assert got.json()["title"] == "through the api"
        assert _reads("replica") == replica_reads + 3


async def test_a_client_reads_its_own_writes_at_once_on_every_instance(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    other = f"replica-{uuid.uuid4().hex[:8]}"
    alice, bob, admin = oidc.auth(owner), oidc.auth(other), oidc.auth("root", ["admin"])
    # Two instances sharing one Redis key prefix, as behind a load balancer.
    prefix = f"test-{uuid.uuid4().hex}:"
    first = _app(make_settings, streaming, redis={"key_prefix": prefix})
    second = _app(make_settings, streaming, redis={"key_prefix": prefix})
    async with running(first) as one, running(second) as two:
        task = (await one.post("/tasks", json={"title": "v1"}, headers=alice)).json()
        await one.post("/tasks", json={"title": "bob's"}, headers=bob)
        await streaming.caught_up()
        await _serving(first)
        await _serving(second)
        for client in (one, two):  # cached on both instances, from the replica
            assert (await client.get("/tasks", headers=alice)).json()["items"][0]["title"] == "v1"
        await streaming.pause_replay()

        patched = await one.patch(f"/tasks/{task['id']}", json={"title": "v2"}, headers=alice)
        assert patched.status_code == 200
        assert (
            await streaming.standby.fetchval("SELECT title FROM tasks WHERE id = $1", task["id"])
            == "v1"
        )  # the standby is behind: only the primary can answer the next reads right
        added = (await two.post("/tasks", json={"title": "new"}, headers=alice)).json()
        for client in (two, one):
            page = (await client.get("/tasks", headers=alice)).json()
            assert sorted(t["title"] for t in page["items"]) == ["new", "v2"]
            assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()["title"] == "v2"
            assert (await client.get(f"/tasks/{added['id']}", headers=alice)).status_code == 200
            admin_page = (await client.get(f"/tasks?owner={owner}", headers=admin)).json()
            assert sorted(t["title"] for t in admin_page["items"]) == ["new", "v2"]
        deleted = await one.delete(f"/tasks/{added['id']}", headers=admin)
        assert deleted.status_code == 204
        for client in (one, two):
            assert (await client.get(f"/tasks/{added['id']}", headers=alice)).status_code == 404

        # A view nobody wrote to since the standby stopped replaying is still read there.
        replica_reads = _reads("replica")
        assert (await two.get("/tasks", headers=bob)).json()["items"][0]["title"] == "bob's"
        assert _reads("replica") == replica_reads + 1


async def test_with_the_cache_off_reads_still_see_their_writes(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    alice = oidc.auth(owner)
    settings = make_settings(
        database={
            "url": streaming.primary.url,
            "replica_url": streaming.standby.url,
            "replica_check_interval": 0.05,
        },
        cache={"enabled": False},
    )
    app = create_app(settings)
    async with running(app) as client:
        task = (await client.post("/tasks", json={"title": "v1"}, headers=alice)).json()
        await streaming.caught_up()
        await _serving(app)
        replica_reads = _reads("replica")
        assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()["title"] == "v1"
        assert _reads("replica") == replica_reads + 1
        await streaming.pause_replay()
        await client.patch(f"/tasks/{task['id']}", json={"title": "v2"}, headers=alice)
        assert (await client.get(f"/tasks/{task['id']}", headers=alice)).json()["title"] == "v2"
        assert _reads("replica") == replica_reads + 1


async def test_a_replica_too_far_behind_serves_nothing(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    alice = oidc.auth(owner)
    app = _app(make_settings, streaming, replica_max_lag=0.5)
    async with running(app) as client:
        await client.post("/tasks", json={"title": "through the api"}, headers=alice)
        await streaming.caught_up()
        await _serving(app)
        await streaming.pause_replay()
        await _insert_behind_the_api(streaming, owner, "only on the primary")
        replica = app_state(app).replica
        assert replica is not None

        async def too_far_behind() -> bool:
            return not replica.serves(0)

        await eventually(too_far_behind, "the replica to fall out of service", 5, 0.02)
        assert replica.lag > 0.5
        titles = [t["title"] for t in (await client.get("/tasks", headers=alice)).json()["items"]]
        assert sorted(titles) == ["only on the primary", "through the api"]

        await streaming.resume_replay()
        await _serving(app)  # caught up again: back in service


async def test_the_primary_answers_when_the_replica_is_down(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    alice = oidc.auth(owner)
    # Measured once at start-up only: the first read after the stop finds the standby gone.
    app = _app(make_settings, streaming, replica_check_interval=60, connect_timeout=2)
    async with running(app) as client:
        task = (await client.post("/tasks", json={"title": "kept"}, headers=alice)).json()
        await streaming.caught_up()
        replica = app_state(app).replica
        assert replica is not None
        await replica.check()
        assert replica.serves(0)
        streaming.standby.stop()

        primary_reads = _reads("primary")
        got = await client.get(f"/tasks/{task['id']}", headers=alice)
        assert got.status_code == 200
        assert got.json()["title"] == "kept"
        assert not replica.serves(0)
        listed = await client.get("/tasks", headers=alice)
        assert listed.status_code == 200
        assert listed.json()["total"] == 1
        assert _reads("primary") == primary_reads + 2
        assert (await client.get("/readyz")).status_code == 200

        streaming.standby.start()
        await replica.check()
        assert replica.serves(0)


async def test_a_server_that_is_not_a_standby_serves_no_reads(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    app = _app(make_settings, streaming, replica_url=streaming.primary.url)
    async with running(app) as client:
        replica = app_state(app).replica
        assert replica is not None
        await replica.check()
        assert not replica.serves(0)
        primary_reads = _reads("primary")
        response = await client.get("/tasks", headers=oidc.auth(owner))
        assert response.status_code == 200
        assert _reads("primary") == primary_reads + 1


async def test_a_standby_behind_what_it_had_replayed_is_measured_again(
    streaming: StreamingPair, make_settings: SettingsFactory
) -> None:
    """A standby that restarted from an earlier point (or another server behind the same
    address) is not trusted for what the one before had replayed."""
    app = _app(make_settings, streaming, replica_check_interval=60)
    async with running(app):
        replica = app_state(app).replica
        assert replica is not None
        await replica.check()
        assert replica.serves(0)
        replica._advance(0)  # the standby reports a replay position behind the last one
        assert not replica.serves(0)
        await replica.check()  # it passes a new sample: trusted again from there
        assert replica.serves(0)


async def test_write_times_have_no_expiry_and_the_clock_never_goes_back(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    app = _app(make_settings, streaming, replica_check_interval=60)
    async with running(app) as client:
        replica = app_state(app).replica
        assert replica is not None

        async def first_sample_taken() -> bool:
            return bool(replica._samples) or replica._replayed_to > 0

        # The replica's first check reads the clock too; the next is a minute away.
        await eventually(first_sample_taken, "the replica's first sample", 5, 0.02)
        cache: ResponseCache = app_state(app).cache
        ahead = await cache.now() + 3_600_000_000  # as if the server's clock had gone back 1 h
        await cache._redis.set(cache._clock_key, ahead)
        assert await cache.now() == ahead + 1
        owner = f"replica-{uuid.uuid4().hex[:8]}"
        await client.post("/tasks", json={"title": "x"}, headers=oidc.auth(owner))
        wrote = f"{cache._generation_key(_view_id(f'owner:{owner}'))}:wrote"
        assert int(await cache._redis.get(wrote) or 0) > ahead + 1
        assert await cache._redis.ttl(wrote) == -1  # never evicted as "expired"


async def test_a_busy_replica_leaves_the_read_to_the_primary_and_stays_in_service(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    app = _app(make_settings, streaming, pool_size=1, max_overflow=0, pool_timeout=0.2)
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    async with running(app) as client:
        await _serving(app)
        replica = app_state(app).replica
        assert replica is not None
        await replica.database.gate.acquire()  # the replica's only connection is taken
        try:
            primary_reads = _reads("primary")
            response = await client.get("/tasks", headers=oidc.auth(owner))
            assert response.status_code == 200
            assert _reads("primary") == primary_reads + 1
            assert replica.serves(0)
        finally:
            replica.database.gate.release()


async def test_a_query_the_replica_refuses_is_answered_by_the_primary(
    streaming: StreamingPair, make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    """A role that may connect to the standby but not read the tasks (as after a rotated
    grant): the read falls back, and the standby is out until a check succeeds."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    await streaming.primary.execute(f"CREATE ROLE {role} LOGIN")
    await streaming.caught_up()
    standby = streaming.standby.url.replace("postgres@", f"{role}@", 1)
    app = _app(make_settings, streaming, replica_url=standby, replica_check_interval=60)
    owner = f"replica-{uuid.uuid4().hex[:8]}"
    async with running(app) as client:
        replica = app_state(app).replica
        assert replica is not None
        await replica.check()
        assert replica.serves(0)
        primary_reads = _reads("primary")
        response = await client.get("/tasks", headers=oidc.auth(owner))
        assert response.status_code == 200
        assert response.json()["total"] == 0
        assert _reads("primary") == primary_reads + 1
        assert not replica.serves(0)
