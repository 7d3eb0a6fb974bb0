"""The users directory: filled from the callers' tokens, refreshed at most once a minute,
searched only among those who share a project (admins: everyone)."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from testing.oidc import OIDCProvider
from tests.conftest import app_state
from tests.fixtures.projects import project, seen_by_directory, share


async def _row(app, sub: str) -> dict[str, object] | None:
    async with app_state(app).engine.connect() as connection:
        row = (
            (await connection.execute(text("SELECT * FROM users WHERE sub = :sub"), {"sub": sub}))
            .mappings()
            .one_or_none()
        )
    return None if row is None else dict(row)


async def test_me_is_the_caller_as_their_token_names_them(client, app, oidc: OIDCProvider):
    headers = {
        "Authorization": f"Bearer {oidc.token('u-1', name='Ann Lee', preferred_username='ann')}"
    }
    me = await client.get("/users/me", headers=headers)
    assert me.json() == {
        "id": "u-1",
        "username": "ann",
        "name": "Ann Lee",
        "email": "u-1@example.com",
    }
    # An unverified address is not the directory's to give out.
    unverified = oidc.token("u-2", email_verified=False)
    me = await client.get("/users/me", headers={"Authorization": f"Bearer {unverified}"})
    assert me.json()["email"] is None
    assert (await client.get("/users/me")).status_code == 401


async def test_any_call_puts_the_caller_in_the_directory_with_an_inbox(client, app, oidc):
    assert (await client.get("/tasks", headers=oidc.auth("newcomer"))).status_code == 200
    row = await _row(app, "newcomer")
    assert row is not None
    assert row["username"] == "newcomer"
    projects = (await client.get("/projects", headers=oidc.auth("newcomer"))).json()
    assert [p["name"] for p in projects["items"]] == ["Inbox"]


async def test_a_burst_of_a_new_callers_requests_writes_their_entry_once(client, app, oidc):
    """Concurrent first requests of one caller in one process: one directory write, not one
    per request (each would wait for a connection before the request's own statement)."""
    writes: list[str] = []

    def capture(statement: str, arguments: object, in_transaction: bool) -> None:
        if "INSERT INTO users" in statement:
            writes.append(statement)

    burst = oidc.auth("bursty")
    with app_state(app).database.observing(capture):
        answers = await asyncio.gather(
            *(client.post("/tasks", json={"title": f"t{n}"}, headers=burst) for n in range(10)),
            *(client.get("/tasks?page_size=3", headers=burst) for _ in range(10)),
        )
    assert sorted(answer.status_code for answer in answers) == [200] * 10 + [201] * 10
    assert len(writes) == 1
    assert (await _row(app, "bursty")) is not None
    assert not app_state(app).directory_writing


async def test_an_entry_is_refreshed_at_most_once_a_minute(client, app, oidc):
    await client.get("/users/me", headers=oidc.auth("ren"))
    first = await _row(app, "ren")
    renamed = {"Authorization": f"Bearer {oidc.token('ren', name='Ren Two')}"}
    # /users/me asks for a refresh every time; within the minute the row keeps its claims.
    assert (await client.get("/users/me", headers=renamed)).json()["name"] is None
    assert await _row(app, "ren") == first
    async with app_state(app).engine.begin() as connection:
        await connection.execute(
            text(
                "UPDATE users SET refreshed_at = refreshed_at - interval '61 seconds'"
                " WHERE sub = 'ren'"
            )
        )
    assert (await client.get("/users/me", headers=renamed)).json()["name"] == "Ren Two"


async def test_search_finds_only_people_who_share_a_project(client, oidc):
    alice, bob, carol = (oidc.auth(u) for u in ("alice", "bob", "carol"))
    await seen_by_directory(client, alice, bob, carol)
    team = await project(client, alice)
    await share(client, alice, team, "bob", "viewer")

    def found(response) -> list[str]:
        assert response.status_code == 200, response.text
        return [user["id"] for user in response.json()]

    assert found(await client.get("/users?q=", headers=alice)) == ["alice", "bob"]
    assert found(await client.get("/users?q=BO", headers=alice)) == ["bob"]
    assert found(await client.get("/users?q=bob@exa", headers=alice)) == ["bob"]
    assert found(await client.get("/users?q=car", headers=alice)) == []  # shares nothing
    assert found(await client.get("/users?q=car", headers=carol)) == ["carol"]
    root = oidc.auth("root", roles=["admin"])
    assert "carol" in found(await client.get("/users?q=c", headers=root))
    # LIKE's wildcards are text here, and bad input is a 422.
    assert found(await client.get("/users?q=%25", headers=alice)) == []
    assert found(await client.get("/users?q=_", headers=alice)) == []
    assert (await client.get("/users?q=%00", headers=alice)).status_code == 422
    assert (await client.get("/users?limit=0", headers=alice)).status_code == 422
