"""Scale-out as deployed: two `taskapp serve` instances on one PostgreSQL, Redis and OIDC
provider, behind Debian's nginx (round robin). Traffic through nginx is spread over both;
a write through nginx is read at once through nginx and on each instance directly (lists,
the admin view, single tasks); the rate limits are one budget per user, and per real client
address for anonymous callers, whichever instance answers.

Loopback addresses stand in for hosts: nginx connects to the instances from PROXY (the
only address in TASKAPP_TRUSTED_PROXIES) and clients connect from addresses of their own.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from reliability.chaos_stack import Nginx
from testing.oidc import OIDCProvider
from tests.conftest import app_state
from tests.fixtures.cluster import (
    Cluster,
    Instance,
    assert_rate_limited,
    counted,
    rate_limit_headers,
    scrape,
    serve_cluster,
    shared_services,
    wait_for_counts,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (apt-get install nginx)"),
]

PROXY = "127.0.0.10"  # nginx's address towards the instances
CLIENT = "127.0.0.21"  # a client's, towards nginx (and an instance, when it goes direct)
OTHER_CLIENT = "127.0.0.22"
USER_LIMIT = 10
ANONYMOUS_LIMIT = 5
PAGE_SIZE = 2
NOT_FOUND = {"detail": "Task not found", "code": "task_not_found"}


@dataclass(frozen=True)
class Front:
    """nginx in front of a cluster."""

    nginx: Nginx
    cluster: Cluster

    @property
    def url(self) -> str:
        return self.nginx.base_url

    def answered_by(self, response: httpx.Response) -> Instance:
        """The instance that answered a request sent through nginx (one, never a retry)."""
        upstream = response.headers["X-Upstream"]
        instances = {f"127.0.0.1:{i.port}": i for i in self.cluster.both}
        assert upstream in instances, upstream
        return instances[upstream]


@contextlib.contextmanager
def _front(tmp: Path, **settings: str) -> Iterator[Front]:
    with serve_cluster(tmp, TASKAPP_TRUSTED_PROXIES=PROXY, **settings) as cluster:
        nginx = Nginx(tmp / "nginx", [cluster.a.port, cluster.b.port], source_address=PROXY)
        try:
            yield Front(nginx, cluster)
        finally:
            nginx.stop()


@pytest.fixture(scope="module")
def open_front(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, oidc: OIDCProvider
) -> Iterator[Front]:
    """Limits out of the way: these tests are about spreading and the cache."""
    with _front(
        tmp_path_factory.mktemp("open-front"),
        **shared_services(database_url, redis_url, oidc),
        TASKAPP_RATE_LIMIT="1000000/second",
        TASKAPP_RATE_LIMIT_ANONYMOUS="1000000/second",
    ) as front:
        yield front


@pytest.fixture(scope="module")
def limited_front(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_url: str, oidc: OIDCProvider
) -> Iterator[Front]:
    with _front(
        tmp_path_factory.mktemp("limited-front"),
        **shared_services(database_url, redis_url, oidc),
        TASKAPP_RATE_LIMIT=f"{USER_LIMIT}/minute",
        TASKAPP_RATE_LIMIT_ANONYMOUS=f"{ANONYMOUS_LIMIT}/minute",
    ) as front:
        yield front


@contextlib.asynccontextmanager
async def _client_at(address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """A client whose connections come from `address`."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        yield client


@pytest.fixture
async def owners(app: FastAPI) -> AsyncIterator[list[str]]:
    """Subjects whose tasks are removed after the test, whatever it left."""
    subjects: list[str] = []
    yield subjects
    async with app_state(app).engine.begin() as connection:
        await connection.execute(
            text("DELETE FROM tasks WHERE owner = ANY(:owners)"), {"owners": subjects}
        )


def _subject(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --- spreading --------------------------------------------------------------------------------


async def test_nginx_spreads_requests_over_both_instances(
    open_front: Front, oidc: OIDCProvider
) -> None:
    auth = oidc.auth(_subject("alice"))
    counter = (
        "http_requests_total",
        {"method": "GET", "route": "/tasks/{task_id}", "status": "404"},
    )
    before = {i: counted(scrape(i, auth), *counter) for i in open_front.cluster.both}
    answered: collections.Counter[Instance] = collections.Counter()
    async with _client_at(CLIENT) as client:
        for _ in range(20):
            response = await client.get(f"{open_front.url}/tasks/{uuid.uuid4()}", headers=auth)
            assert (response.status_code, response.json()) == (404, NOT_FOUND)
            answered[open_front.answered_by(response)] += 1
    # Round robin: every other request on each instance; and each instance counted exactly
    # the requests nginx says it sent there.
    assert answered == {open_front.cluster.a: 10, open_front.cluster.b: 10}
    for instance in open_front.cluster.both:
        expected = before[instance] + answered[instance]
        after = wait_for_counts(instance, auth, [(*counter, expected)])
        assert counted(after, *counter) == expected, instance


# --- the response cache -----------------------------------------------------------------------


class Reads:
    """Each read four times: twice through nginx (one answer from each instance), then on
    each instance directly."""

    def __init__(self, front: Front, via_nginx: httpx.AsyncClient, direct: httpx.AsyncClient):
        self.front = front
        self.via_nginx = via_nginx
        self.direct = direct

    async def everywhere(
        self, path: str, auth: dict[str, str], **params: Any
    ) -> list[tuple[str, httpx.Response]]:
        answers: list[tuple[str, httpx.Response]] = []
        for _ in range(2):
            response = await self.via_nginx.get(self.front.url + path, params=params, headers=auth)
            answers.append((f"nginx->{self.front.answered_by(response).name}", response))
        assert {name for name, _ in answers} == {"nginx->A", "nginx->B"}
        for instance in self.front.cluster.both:
            response = await self.direct.get(instance.base_url + path, params=params, headers=auth)
            answers.append((instance.name, response))
        return answers

    async def aim_at(self, instance: Instance) -> None:
        """Make `instance` the one nginx sends the next request to (round robin)."""
        for _ in range(2):
            probe = await self.via_nginx.get(f"{self.front.url}/healthz")
            if self.front.answered_by(probe) != instance:
                return
        pytest.fail("nginx sent two requests in a row to one instance")


async def test_writes_through_nginx_are_read_at_once_everywhere(
    open_front: Front, oidc: OIDCProvider, owners: list[str]
) -> None:
    alice_sub, admin_sub = _subject("alice"), _subject("admin")
    owners.append(alice_sub)
    alice = oidc.auth(alice_sub)
    admin = oidc.auth(admin_sub, roles=["admin"])
    a, b = open_front.cluster.both
    hits_before = {
        i: counted(scrape(i, admin), "taskapp_cache_requests_total", {"result": "hit"})
        for i in (a, b)
    }
    async with _client_at(CLIENT) as via_nginx, _client_at() as direct:
        reads = Reads(open_front, via_nginx, direct)
        baseline = (await direct.get(f"{a.base_url}/tasks", headers=admin)).json()["total"]
        tasks: list[dict[str, Any]] = []  # alice's, newest first, as the API lists them

        async def check(current: dict[str, Any] | None, deleted: str | None) -> None:
            """Every view a write changes, as the owner and as the admin, everywhere."""
            own = await reads.everywhere("/tasks", alice, page_size=PAGE_SIZE)
            filtered = await reads.everywhere("/tasks", admin, owner=alice_sub, page_size=PAGE_SIZE)
            for where, response in own + filtered:
                assert response.status_code == 200, (where, response.text)
                page = response.json()
                assert (page["total"], page["items"]) == (len(tasks), tasks[:PAGE_SIZE]), where
            for where, response in await reads.everywhere("/tasks", admin, page_size=PAGE_SIZE):
                page = response.json()
                assert page["total"] == baseline + len(tasks), where
                assert page["items"] == tasks[:PAGE_SIZE], where
            for auth in (alice, admin):
                if current is not None:
                    for where, response in await reads.everywhere(f"/tasks/{current['id']}", auth):
                        assert (response.status_code, response.json()) == (200, current), where
                if deleted is not None:
                    for where, response in await reads.everywhere(f"/tasks/{deleted}", auth):
                        assert (response.status_code, response.json()) == (404, NOT_FOUND), where

        # Two older tasks, so a create pushes one off the first page and a delete brings it back.
        for title in ("older", "old"):
            created = await via_nginx.post(
                f"{open_front.url}/tasks", json={"title": title}, headers=alice
            )
            assert created.status_code == 201, created.text
            tasks.insert(0, created.json())
        await check(None, None)  # every view cached on both instances before the first write

        writers: list[Instance] = []
        current: dict[str, Any] | None = None
        # Three lifecycles (alice creates, updates; the admin deletes), the writes alternating
        # between the instances: each kind of write lands on each instance. The admin also
        # makes the update in the second.
        for round_, (step, by_admin) in enumerate(
            (step, lifecycle == 1) for lifecycle in range(3) for step in ("create", "patch", "del")
        ):
            writer = open_front.cluster.both[round_ % 2]
            await reads.aim_at(writer)
            deleted = None
            if step == "create":
                response = await via_nginx.post(
                    f"{open_front.url}/tasks", json={"title": f"round {round_}"}, headers=alice
                )
                assert response.status_code == 201, response.text
                current = response.json()
                tasks.insert(0, response.json())
            elif step == "patch":
                assert current is not None
                response = await via_nginx.patch(
                    f"{open_front.url}/tasks/{current['id']}",
                    json={"title": f"round {round_} renamed", "status": "in_progress"},
                    headers=admin if by_admin else alice,
                )
                assert response.status_code == 200, response.text
                current = response.json()
                assert current["title"] == f"round {round_} renamed"
                tasks[0] = current
            else:
                assert current is not None
                response = await via_nginx.delete(  # admins only
                    f"{open_front.url}/tasks/{current['id']}", headers=admin
                )
                assert response.status_code == 204, response.text
                deleted, current = current["id"], None
                tasks.pop(0)
            writers.append(open_front.answered_by(response))
            # Right after the write: through nginx first (the other instance), then directly.
            await check(current, deleted)
        assert writers == [open_front.cluster.both[i % 2] for i in range(9)]

    # The views were served from each instance's cache, not only loaded: each list view is
    # read twice on each instance per check (10 checks), and only one of its four reads after
    # a write can be the one that loads it.
    for instance in (a, b):
        hits = counted(scrape(instance, admin), "taskapp_cache_requests_total", {"result": "hit"})
        assert hits - hits_before[instance] >= 3 * 10, instance


# --- rate limits ------------------------------------------------------------------------------


async def test_a_users_limit_is_one_budget_whichever_instance_answers(
    limited_front: Front, oidc: OIDCProvider
) -> None:
    alice = oidc.auth(_subject("alice"))
    url = f"{limited_front.url}/tasks"
    async with _client_at(CLIENT) as client, _client_at() as direct:
        remaining, answered = [], []
        for i in range(USER_LIMIT):
            response = await client.get(url, headers=alice)
            assert response.status_code == 200, (i, response.text)
            limit, left, reset = rate_limit_headers(response)
            assert limit == USER_LIMIT
            assert reset >= 1
            remaining.append(left)
            answered.append(limited_front.answered_by(response).name)
        # One budget: the instances took turns, and each saw what the other had counted.
        turns = USER_LIMIT // 2
        assert answered in (["A", "B"] * turns, ["B", "A"] * turns)
        assert remaining == list(range(USER_LIMIT - 1, -1, -1))

        # Spent on both instances, for reads and for writes (refused before the database).
        for method in ("GET", "POST"):
            refused_by = set()
            for _ in range(2):
                body = {"title": "over the limit"} if method == "POST" else None
                response = await client.request(method, url, json=body, headers=alice)
                assert_rate_limited(response, USER_LIMIT)
                refused_by.add(limited_front.answered_by(response))
            assert refused_by == set(limited_front.cluster.both), method
        for instance in limited_front.cluster.both:  # and directly, from another address
            refused = await direct.get(f"{instance.base_url}/tasks", headers=alice)
            assert_rate_limited(refused, USER_LIMIT)

        bob = oidc.auth(_subject("bob"))
        answers = [await client.get(url, headers=bob) for _ in range(2)]
        assert [r.status_code for r in answers] == [200, 200]
        assert {limited_front.answered_by(r) for r in answers} == set(limited_front.cluster.both)
        assert [rate_limit_headers(r)[:2] for r in answers] == [
            (USER_LIMIT, USER_LIMIT - 1),
            (USER_LIMIT, USER_LIMIT - 2),
        ]


async def test_anonymous_callers_are_limited_by_their_real_address(
    limited_front: Front,
) -> None:
    url = f"{limited_front.url}/tasks"
    both = set(limited_front.cluster.both)
    async with _client_at(CLIENT) as client, _client_at(OTHER_CLIENT) as other:
        remaining, answered = [], set()
        for i in range(ANONYMOUS_LIMIT):
            response = await client.get(url)
            assert response.status_code == 401, (i, response.text)
            remaining.append(rate_limit_headers(response)[1])
            answered.add(limited_front.answered_by(response))
        assert remaining == list(range(ANONYMOUS_LIMIT - 1, -1, -1))
        assert answered == both

        # Spent, on both instances; naming another address in X-Forwarded-For changes
        # nothing (nginx appends the address it sees, and only that one is believed).
        refused_by = set()
        for forwarded in (None, None, "198.51.100.7", "198.51.100.8, 127.0.0.22"):
            headers = {"X-Forwarded-For": forwarded} if forwarded else {}
            response = await client.get(url, headers=headers)
            assert_rate_limited(response, ANONYMOUS_LIMIT)
            refused_by.add(limited_front.answered_by(response))
        assert refused_by == both
        # The same address without the proxy is the same caller.
        for instance in limited_front.cluster.both:
            assert_rate_limited(await client.get(f"{instance.base_url}/tasks"), ANONYMOUS_LIMIT)

        # Another address through the same nginx has a budget of its own: the proxy's address
        # is nobody's bucket.
        answers = [await other.get(url) for _ in range(2)]
        assert [r.status_code for r in answers] == [401, 401]
        assert {limited_front.answered_by(r) for r in answers} == both
        assert [rate_limit_headers(r)[1] for r in answers] == [
            ANONYMOUS_LIMIT - 1,
            ANONYMOUS_LIMIT - 2,
        ]


async def test_only_the_proxy_is_believed_even_from_loopback(limited_front: Front) -> None:
    """A client reaching an instance directly from 127.0.0.1 (not the proxy's address) names
    a new address in X-Forwarded-For each time: it is still one caller."""
    async with _client_at("127.0.0.1") as client:
        statuses = []
        for i in range(ANONYMOUS_LIMIT + 2):
            instance = limited_front.cluster.both[i % 2]
            response = await client.get(
                f"{instance.base_url}/tasks", headers={"X-Forwarded-For": f"198.51.100.{i + 1}"}
            )
            statuses.append(response.status_code)
        assert statuses == [401] * ANONYMOUS_LIMIT + [429, 429]
