"""Two `taskapp serve --workers 2` instances sharing one PostgreSQL, Redis and OIDC provider:
the response cache is never stale after a write made on another process or instance, never
leaks between users, and the rate limits are one budget across every process."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from sqlalchemy import text

from testing.oidc import OIDCProvider
from tests.conftest import app_state
from tests.fixtures.cluster import (
    Cluster,
    Instance,
    assert_rate_limited,
    rate_limit_headers,
    serve_cluster,
    shared_services,
)

pytestmark = pytest.mark.slow

NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}
USER_LIMIT = 10
ANONYMOUS_LIMIT = 5


@pytest.fixture(scope="module")
def cache_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, oidc: OIDCProvider
) -> Iterator[Cluster]:
    """Limits out of the way: these tests are about the cache."""
    with serve_cluster(
        tmp_path_factory.mktemp("cache-cluster"),
        **shared_services(database_url, redis_url, oidc),
        TASKAPP_RATE_LIMIT="1000000/second",
        TASKAPP_RATE_LIMIT_ANONYMOUS="1000000/second",
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def limited_cluster(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, oidc: OIDCProvider
) -> Iterator[Cluster]:
    with serve_cluster(
        tmp_path_factory.mktemp("limited-cluster"),
        **shared_services(database_url, redis_url, oidc),
        TASKAPP_RATE_LIMIT=f"{USER_LIMIT}/minute",
        TASKAPP_RATE_LIMIT_ANONYMOUS=f"{ANONYMOUS_LIMIT}/minute",
    ) as cluster:
        yield cluster


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client opening a new connection per request, so requests land on either worker of
    an instance; the tasks written through it are removed afterwards."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        yield client
    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks"))
    await app_state(app).cache.clear()


def _subject(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --- cache coherence ------------------------------------------------------------------------


class Reader:
    """Reads the views a write must change, on one instance, as one caller."""

    def __init__(self, http: httpx.AsyncClient, auth: dict[str, str]) -> None:
        self.http = http
        self.auth = auth

    async def page(self, instance: Instance, **params: Any) -> dict[str, Any]:
        response = await self.http.get(
            f"{instance.base_url}/tasks",
            params={"page": 1, "page_size": 5, **params},
            headers=self.auth,
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def task(self, instance: Instance, task_id: str) -> httpx.Response:
        return await self.http.get(f"{instance.base_url}/tasks/{task_id}", headers=self.auth)


def _ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["items"]]


async def test_a_write_on_one_instance_is_read_at_once_on_the_other(
    http: httpx.AsyncClient, cache_cluster: Cluster, oidc: OIDCProvider
) -> None:
    alice_sub, admin_sub = _subject("alice"), _subject("admin")
    alice = Reader(http, oidc.auth(alice_sub))
    admin = Reader(http, oidc.auth(admin_sub, roles=["admin"]))
    admin_baseline = (await admin.page(cache_cluster.a))["total"]
    # Newest first, as the API lists them: what each view must show after every write.
    alice_tasks: list[dict[str, Any]] = []
    admin_tasks: list[dict[str, Any]] = []  # tasks owned by the admin
    everyone: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None

    async def check(instance: Instance, deleted: str | None) -> None:
        alice_page = await alice.page(instance)
        assert alice_page["total"] == len(alice_tasks)
        assert alice_page["items"] == alice_tasks[:5]
        filtered = await admin.page(instance, owner=alice_sub)
        assert filtered["total"] == len(alice_tasks)
        assert filtered["items"] == alice_tasks[:5]
        own = await admin.page(instance, owner=admin_sub)
        assert (own["total"], own["items"]) == (len(admin_tasks), admin_tasks[:5])
        admin_page = await admin.page(instance)
        assert admin_page["total"] == admin_baseline + len(everyone)
        assert admin_page["items"][: min(5, len(everyone))] == everyone[:5]
        if current is not None:
            assert (await admin.task(instance, current["id"])).json() == current
            owner_view = await (alice if current["owner"] == alice_sub else admin).task(
                instance, current["id"]
            )
            assert owner_view.status_code == 200
            assert owner_view.json() == current
        if deleted is not None:
            for reader in (alice, admin):
                gone = await reader.task(instance, deleted)
                assert (gone.status_code, gone.json()) == (404, NOT_FOUND)

    rounds = 30
    for i in range(rounds):
        writer, reader = cache_cluster.both if i % 2 == 0 else cache_cluster.both[::-1]
        # Warm every view on both instances: stale entries exist when the write lands.
        await check(reader, None)
        await check(writer, None)
        deleted = None
        step, lifecycle = i % 3, i // 3
        if step == 0:
            # Users create their own tasks; the admin creates one of its own every other time.
            creator = alice if lifecycle % 2 == 0 else admin
            response = await http.post(
                f"{writer.base_url}/tasks",
                json={"title": f"round {i}", "description": f"made on {writer.name}"},
                headers=creator.auth,
            )
            assert response.status_code == 201, response.text
            current = response.json()
            (alice_tasks if creator is alice else admin_tasks).insert(0, current)
            everyone.insert(0, current)
        elif step == 1:
            assert current is not None
            response = await http.patch(
                f"{writer.base_url}/tasks/{current['id']}",
                json={"title": f"round {i} renamed", "status": "in_progress"},
                headers=admin.auth,
            )
            assert response.status_code == 200, response.text
            updated = response.json()
            assert updated["title"] == f"round {i} renamed"
            for tasks in (alice_tasks, admin_tasks, everyone):
                tasks[:] = [updated if t["id"] == updated["id"] else t for t in tasks]
            current = updated
        else:
            assert current is not None
            response = await http.delete(
                f"{writer.base_url}/tasks/{current['id']}", headers=admin.auth
            )
            assert response.status_code == 204, response.text
            deleted = current["id"]
            for tasks in (alice_tasks, admin_tasks, everyone):
                tasks[:] = [t for t in tasks if t["id"] != deleted]
            current = None
        # At once, on the other instance first, then on the writer's.
        await check(reader, deleted)
        await check(writer, deleted)
    assert len(everyone) == 0  # every lifecycle ended with its delete


async def test_the_cache_is_shared_and_a_users_write_reaches_the_admin_view(
    http: httpx.AsyncClient, cache_cluster: Cluster, oidc: OIDCProvider, redis_url: str
) -> None:
    alice_sub = _subject("alice")
    alice = Reader(http, oidc.auth(alice_sub))
    admin = Reader(http, oidc.auth(_subject("admin"), roles=["admin"]))
    a, b = cache_cluster.both
    first = await http.post(f"{a.base_url}/tasks", json={"title": "first"}, headers=alice.auth)
    assert first.status_code == 201
    # Warmed on B: the entries are in the shared Redis, under this cluster's prefix only.
    admin_before = await admin.page(b)
    assert first.json() in admin_before["items"]
    assert (await alice.task(b, first.json()["id"])).status_code == 200
    client = redis.Redis.from_url(redis_url)
    try:
        entries = [
            key
            for key in client.scan_iter(match=f"{cache_cluster.key_prefix}cache:*", count=1000)
            if b":gen:" not in key and not key.endswith(b"epoch")
        ]
    finally:
        client.close()
    assert entries, "nothing was cached: the coherence checks would prove nothing"

    # A user's write on A is in the admin's list (and the owner-filtered list) on B at once.
    second = await http.post(f"{a.base_url}/tasks", json={"title": "second"}, headers=alice.auth)
    assert second.status_code == 201
    admin_after = await admin.page(b)
    assert admin_after["total"] == admin_before["total"] + 1
    assert admin_after["items"][0] == second.json()
    assert (await admin.page(b, owner=alice_sub))["items"] == [second.json(), first.json()]
    # And the user's own change of status, on B, is in the admin's view on A at once.
    await admin.page(a, status="completed")
    done = await http.patch(
        f"{b.base_url}/tasks/{first.json()['id']}", json={"status": "completed"}, headers=alice.auth
    )
    assert done.status_code == 200
    assert (await admin.page(a, status="completed"))["items"] == [done.json()]
    assert (await admin.task(a, first.json()["id"])).json()["status"] == "completed"


async def test_users_never_see_each_others_cached_pages(
    http: httpx.AsyncClient, cache_cluster: Cluster, oidc: OIDCProvider
) -> None:
    alice_sub, bob_sub = _subject("alice"), _subject("bob")
    alice = Reader(http, oidc.auth(alice_sub))
    bob = Reader(http, oidc.auth(bob_sub))
    a, b = cache_cluster.both
    owned: dict[str, set[str]] = {alice_sub: set(), bob_sub: set()}
    for i, (reader, sub) in enumerate([(alice, alice_sub)] * 3 + [(bob, bob_sub)] * 2):
        instance = cache_cluster.both[i % 2]
        response = await http.post(
            f"{instance.base_url}/tasks", json={"title": f"{sub} {i}"}, headers=reader.auth
        )
        assert response.status_code == 201
        owned[sub].add(response.json()["id"])

    for params in ({}, {"page_size": 10}, {"status": "pending"}, {"page": 2, "page_size": 2}):
        # Alice's page is cached first; Bob asks the same thing on both instances, then Alice
        # again after Bob's answer is cached.
        for reader, sub, instance in [
            (alice, alice_sub, a),
            (bob, bob_sub, b),
            (bob, bob_sub, a),
            (alice, alice_sub, b),
        ]:
            page = await reader.page(instance, **params)
            assert page["total"] == len(owned[sub])
            assert {item["owner"] for item in page["items"]} <= {sub}
            assert set(_ids(page)) <= owned[sub]
    for task_id in owned[alice_sub]:
        assert (await alice.task(a, task_id)).status_code == 200  # cached for Alice
        for instance in (a, b):
            response = await bob.task(instance, task_id)
            assert (response.status_code, response.json()) == (404, NOT_FOUND)


# --- rate limits ----------------------------------------------------------------------------


async def test_the_user_limit_is_one_budget_across_instances(
    http: httpx.AsyncClient, limited_cluster: Cluster, oidc: OIDCProvider
) -> None:
    alice = oidc.auth(_subject("alice"))
    remaining = []
    for i in range(USER_LIMIT):
        instance = limited_cluster.both[i % 2]
        response = await http.get(f"{instance.base_url}/tasks", headers=alice)
        assert response.status_code == 200, (i, response.status_code, response.text)
        limit, left, reset = rate_limit_headers(response)
        assert limit == USER_LIMIT
        assert reset >= 1
        remaining.append(left)
    assert remaining == list(range(USER_LIMIT - 1, -1, -1))

    for instance in (*limited_cluster.both, limited_cluster.a):
        assert_rate_limited(await http.get(f"{instance.base_url}/tasks", headers=alice), USER_LIMIT)
        # Writes count against the same budget: refused before they reach the database.
        refused = await http.post(f"{instance.base_url}/tasks", json={"title": "x"}, headers=alice)
        assert_rate_limited(refused, USER_LIMIT)

    bob = oidc.auth(_subject("bob"))
    for instance in limited_cluster.both:
        response = await http.get(f"{instance.base_url}/tasks", headers=bob)
        assert response.status_code == 200
        assert response.json()["total"] == 0
    assert rate_limit_headers(response)[:2] == (USER_LIMIT, USER_LIMIT - 2)


async def test_requests_without_a_valid_token_are_limited_per_ip_but_probes_never(
    http: httpx.AsyncClient, limited_cluster: Cluster, oidc: OIDCProvider
) -> None:
    stranger = OIDCProvider(base_url=oidc.base_url)
    stranger.add_key()  # a key the real provider never published
    failing: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": f"Bearer {stranger.token('alice')}"},
        {"Authorization": f"Bearer {oidc.token('alice', exp=int(time.time()) - 3600)}"},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    ]
    assert len(failing) == ANONYMOUS_LIMIT
    remaining = []
    for i, headers in enumerate(failing):
        instance = limited_cluster.both[i % 2]
        response = await http.get(f"{instance.base_url}/tasks", headers=headers)
        assert response.status_code == 401, (i, response.text)
        limit, left, _ = rate_limit_headers(response)
        assert limit == ANONYMOUS_LIMIT
        remaining.append(left)
    assert remaining == list(range(ANONYMOUS_LIMIT - 1, -1, -1))

    for instance, headers in zip(limited_cluster.both, failing[:2], strict=True):
        assert_rate_limited(
            await http.get(f"{instance.base_url}/tasks", headers=headers), ANONYMOUS_LIMIT
        )
    # No proxy is trusted here (TASKAPP_TRUSTED_PROXIES unset), not even one on loopback:
    # naming another address in X-Forwarded-For does not buy a new budget.
    for i, instance in enumerate(limited_cluster.both):
        spoofed = {"X-Forwarded-For": f"198.51.100.{i + 1}"}
        response = await http.get(f"{instance.base_url}/tasks", headers=spoofed)
        assert_rate_limited(response, ANONYMOUS_LIMIT)
    # A caller with a valid token from the same address has a budget of its own.
    carol_auth = oidc.auth(_subject("carol"))
    carol = await http.get(f"{limited_cluster.b.base_url}/tasks", headers=carol_auth)
    assert carol.status_code == 200
    assert rate_limit_headers(carol)[:2] == (USER_LIMIT, USER_LIMIT - 1)

    # With this address's budget spent, the health probes still answer, every time.
    for i in range(50):
        for path in ("/healthz", "/readyz"):
            response = await http.get(f"{limited_cluster.both[i % 2].base_url}{path}")
            assert response.status_code == 200, (i, path, response.text)


# --- shared projects ---------------------------------------------------------------------------


async def test_a_shared_project_is_coherent_across_instances(
    http: httpx.AsyncClient, cache_cluster: Cluster, oidc: OIDCProvider
) -> None:
    """A change in a shared project is seen at once by every member through the other
    instance; a removed member is refused at once, on both, whatever they had cached."""
    owner, member = _subject("owner"), _subject("member")
    auth = {owner: oidc.auth(owner), member: oidc.auth(member)}
    a, b = cache_cluster.both
    for instance in (a, b):
        for headers in auth.values():
            me = await http.get(f"{instance.base_url}/users/me", headers=headers)
            assert me.status_code == 200, me.text
    made = await http.post(f"{a.base_url}/projects", json={"name": "Shared"}, headers=auth[owner])
    team = made.json()["id"]
    shared = await http.put(
        f"{b.base_url}/projects/{team}/members/{member}",
        json={"role": "editor"},
        headers=auth[owner],
    )
    assert shared.status_code == 200, shared.text
    reader = Reader(http, auth[member])
    # Warm the member's views on both instances (several times: either worker).
    for _ in range(4):
        for instance in (a, b):
            assert (await reader.page(instance, project=team))["total"] == 0

    task = await http.post(
        f"{a.base_url}/tasks", json={"title": "one", "project_id": team}, headers=auth[owner]
    )
    assert task.status_code == 201, task.text
    task_id = task.json()["id"]
    for _ in range(4):
        for instance in (a, b):
            assert _ids(await reader.page(instance, project=team)) == [task_id]
            assert (await reader.task(instance, task_id)).json()["title"] == "one"

    renamed = await http.patch(
        f"{b.base_url}/tasks/{task_id}", json={"title": "two"}, headers=auth[member]
    )
    assert renamed.status_code == 200, renamed.text
    owner_reader = Reader(http, auth[owner])
    for _ in range(4):
        for instance in (a, b):
            assert (await owner_reader.task(instance, task_id)).json()["title"] == "two"
            assert (await reader.page(instance))["items"][0]["title"] == "two"

    removed = await http.delete(
        f"{a.base_url}/projects/{team}/members/{member}", headers=auth[owner]
    )
    assert removed.status_code == 204
    for _ in range(4):
        for instance in (a, b):
            assert (await reader.task(instance, task_id)).status_code == 404
            assert (await reader.page(instance))["total"] == 0
            gone = await http.get(f"{instance.base_url}/tasks?project={team}", headers=auth[member])
            assert gone.json()["code"] == "project_not_found"
