"""Bad input: always a 4xx (never a 500), in the one error shape, and nothing is written."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from testing.oidc import OIDCProvider
from tests.fixtures.tasks import db_count, db_row

SECRET = "s3cr3t-marker"  # a value that must never be echoed back


def assert_validation_error(response: httpx.Response) -> None:
    """A 422 in FastAPI's shape, listing loc/msg/type only: the input is never echoed."""
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], list)
    assert body["detail"]
    for error in body["detail"]:
        assert set(error) == {"loc", "msg", "type"}, error
        assert isinstance(error["loc"], list)
        assert isinstance(error["msg"], str)
        assert isinstance(error["type"], str)


def assert_client_error(response: httpx.Response) -> None:
    """Some 4xx with a `detail`; in particular not a 500."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"detail", "code"}
    if isinstance(body["detail"], list):
        for error in body["detail"]:
            assert "input" not in error


@pytest.fixture
def alice(oidc: OIDCProvider) -> dict[str, str]:
    return oidc.auth("alice")


@pytest.fixture
def admin(oidc: OIDCProvider) -> dict[str, str]:
    return oidc.auth("root", roles=["admin"])


@pytest.fixture
async def existing(client: httpx.AsyncClient, alice: dict[str, str]) -> dict[str, Any]:
    """One task, so that "nothing written" also means "nothing changed"."""
    response = await client.post(
        "/tasks",
        json={"title": "Existing", "description": "Untouched", "status": "in_progress"},
        headers=alice,
    )
    assert response.status_code == 201
    body: dict[str, Any] = response.json()
    return body


# --- bodies -------------------------------------------------------------------------------

BAD_TITLES: dict[str, Any] = {
    "empty": "",
    "spaces": "   ",
    "whitespace": " \t\n\r ",
    "too-long": "x" * 256,
    "too-long-after-trim": " " + "x" * 256 + " ",
    "number": 123,
    "float": 1.5,
    "bool": True,
    "list": ["a title"],
    "null": None,
    "object": {"title": "nested"},
    "nul-byte": "a\u0000b",
    "only-nul": "\u0000",
}

BAD_CREATES: dict[str, dict[str, Any]] = {
    "title-missing": {},
    "title-missing-with-description": {"description": "no title"},
    **{f"title-{name}": {"title": value} for name, value in BAD_TITLES.items()},
    "description-too-long": {"title": "ok", "description": "d" * 10_001},
    "description-number": {"title": "ok", "description": 5},
    "description-list": {"title": "ok", "description": ["x"]},
    "description-object": {"title": "ok", "description": {"a": 1}},
    "description-nul-byte": {"title": "ok", "description": "line\u0000break"},
    "status-unknown": {"title": "ok", "status": "done"},
    "status-wrong-case": {"title": "ok", "status": "PENDING"},
    "status-empty": {"title": "ok", "status": ""},
    "status-null": {"title": "ok", "status": None},
    "status-number": {"title": "ok", "status": 1},
    "unknown-field": {"title": "ok", "priority": 1},
    "owner-field": {"title": "ok", "owner": "bob"},
    "id-field": {"title": "ok", "id": str(uuid.uuid4())},
    "created_at-field": {"title": "ok", "created_at": "2020-01-01T00:00:00Z"},
}


@pytest.mark.parametrize("body", list(BAD_CREATES.values()), ids=list(BAD_CREATES))
async def test_create_rejects_bad_body(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    body: dict[str, Any],
) -> None:
    count = await db_count(app)
    response = await client.post("/tasks", json=body, headers=alice)
    assert_validation_error(response)
    assert await db_count(app) == count


BAD_PATCHES: dict[str, dict[str, Any]] = {
    "empty-object": {},
    "title-null": {"title": None},
    "status-null": {"status": None},
    "title-null-with-valid-status": {"title": None, "status": "completed"},
    **{
        f"title-{name}": {"title": value} for name, value in BAD_TITLES.items() if value is not None
    },
    "description-too-long": {"description": "d" * 10_001},
    "description-number": {"description": 5},
    "description-list": {"description": ["x"]},
    "description-nul-byte": {"description": "\u0000"},
    "status-unknown": {"status": "done"},
    "status-wrong-case": {"status": "Completed"},
    "status-number": {"status": 2},
    "unknown-field": {"priority": 1},
    "unknown-with-valid": {"title": "ok", "priority": 1},
    "owner-field": {"owner": "bob"},
    "id-field": {"id": str(uuid.uuid4())},
    "updated_at-field": {"updated_at": "2020-01-01T00:00:00Z"},
    "valid-title-bad-status": {"title": "ok", "status": "nope"},
}


@pytest.mark.parametrize("as_admin", [False, True], ids=["user", "admin"])
@pytest.mark.parametrize("body", list(BAD_PATCHES.values()), ids=list(BAD_PATCHES))
async def test_patch_rejects_bad_body(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    admin: dict[str, str],
    existing: dict[str, Any],
    body: dict[str, Any],
    as_admin: bool,
) -> None:
    before = await db_row(app, existing["id"])
    response = await client.patch(
        f"/tasks/{existing['id']}", json=body, headers=admin if as_admin else alice
    )
    assert_validation_error(response)
    assert await db_row(app, existing["id"]) == before


@pytest.mark.parametrize(
    ("title", "stored"),
    [
        ("x" * 255, "x" * 255),
        ("  " + "y" * 255 + "\t", "y" * 255),
        ("z", "z"),
        ("é" * 255, "é" * 255),
        ("😀" * 255, "😀" * 255),
    ],
    ids=["255", "255-after-trim", "1", "255-accented", "255-astral"],
)
async def test_title_boundaries_accepted(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    title: str,
    stored: str,
) -> None:
    created = await client.post("/tasks", json={"title": title}, headers=alice)
    assert created.status_code == 201, created.text
    assert created.json()["title"] == stored
    assert (await db_row(app, created.json()["id"]) or {})["title"] == stored
    patched = await client.patch(f"/tasks/{existing['id']}", json={"title": title}, headers=alice)
    assert patched.status_code == 200, patched.text
    assert (await db_row(app, existing["id"]) or {})["title"] == stored


async def test_description_boundary_accepted(
    client: httpx.AsyncClient, app: FastAPI, alice: dict[str, str], existing: dict[str, Any]
) -> None:
    description = "d" * 10_000
    created = await client.post(
        "/tasks", json={"title": "t", "description": description}, headers=alice
    )
    assert created.status_code == 201, created.text
    assert (await db_row(app, created.json()["id"]) or {})["description"] == description
    patched = await client.patch(
        f"/tasks/{existing['id']}", json={"description": description}, headers=alice
    )
    assert patched.status_code == 200, patched.text
    assert (await db_row(app, existing["id"]) or {})["description"] == description


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_rejected_input_is_not_echoed(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    method: str,
) -> None:
    count = await db_count(app)
    url = "/tasks" if method == "POST" else f"/tasks/{existing['id']}"
    for body in (
        {"title": SECRET * 30},
        {"title": "ok", "description": SECRET * 1000},
        {"title": "ok", "status": SECRET},
        {"title": "ok", SECRET: "x"},
        {"title": [SECRET]},
    ):
        response = await client.request(method, url, json=body, headers=alice)
        assert_validation_error(response)
        loc_free = [error["msg"] for error in response.json()["detail"]]
        assert SECRET not in " ".join(loc_free)
        if SECRET not in body:  # an unknown field's name is rightly part of its loc
            assert SECRET not in response.text
    assert await db_count(app) == count


# --- raw bodies ---------------------------------------------------------------------------

LONE_SURROGATES: dict[str, bytes] = {
    "title-high": b'{"title": "\\ud800"}',
    "title-low": b'{"title": "ok \\udc00 ok"}',
    "description": b'{"title": "ok", "description": "\\udbff"}',
}


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize("raw", list(LONE_SURROGATES.values()), ids=list(LONE_SURROGATES))
async def test_lone_surrogate_is_422(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    raw: bytes,
    method: str,
) -> None:
    count = await db_count(app)
    before = await db_row(app, existing["id"])
    url = "/tasks" if method == "POST" else f"/tasks/{existing['id']}"
    response = await client.request(
        method, url, content=raw, headers={**alice, "Content-Type": "application/json"}
    )
    assert_validation_error(response)
    assert await db_count(app) == count
    assert await db_row(app, existing["id"]) == before


RAW_BODIES: dict[str, tuple[bytes, str | None]] = {
    "not-json": (b"title=hello", "application/json"),
    "truncated-json": (b'{"title": ', "application/json"),
    "trailing-garbage": (b'{"title": "ok"} x', "application/json"),
    "invalid-utf8": (b'{"title": "\xff\xfe"}', "application/json"),
    "invalid-utf8-overlong": (b'{"title": "\xc0\xaf"}', "application/json"),
    "empty": (b"", "application/json"),
    "empty-no-content-type": (b"", None),
    "array": (b'[{"title": "in an array"}]', "application/json"),
    "string": (b'"a title"', "application/json"),
    "number": (b"42", "application/json"),
    "null": (b"null", "application/json"),
    "text-plain": (b'{"title": "plain"}', "text/plain"),
    "form": (b"title=plain", "application/x-www-form-urlencoded"),
    "nan": (b'{"title": NaN}', "application/json"),
    "deep-nesting": (b'{"title": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json"),
}


@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize(("raw", "content_type"), list(RAW_BODIES.values()), ids=list(RAW_BODIES))
async def test_unparseable_body_is_4xx(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    raw: bytes,
    content_type: str | None,
    method: str,
) -> None:
    count = await db_count(app)
    before = await db_row(app, existing["id"])
    headers = dict(alice)
    if content_type is not None:
        headers["Content-Type"] = content_type
    url = "/tasks" if method == "POST" else f"/tasks/{existing['id']}"
    response = await client.request(method, url, content=raw, headers=headers)
    assert_client_error(response)
    assert await db_count(app) == count
    assert await db_row(app, existing["id"]) == before


# --- path and query -----------------------------------------------------------------------

BAD_IDS = [
    "not-a-uuid",
    "123",
    "00000000-0000-0000-0000-00000000000g",
    "00000000-0000-0000-0000-0000000000001",
    "1' OR '1'='1",
    "%00",
]


@pytest.mark.parametrize("task_id", BAD_IDS)
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
async def test_bad_uuid_in_path_is_422(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    admin: dict[str, str],
    existing: dict[str, Any],
    method: str,
    task_id: str,
) -> None:
    count = await db_count(app)
    before = await db_row(app, existing["id"])
    # DELETE needs the admin role, which is checked before the path is looked at.
    auth = admin if method == "DELETE" else alice
    kwargs: dict[str, Any] = {"json": {"title": "x"}} if method == "PATCH" else {}
    response = await client.request(method, f"/tasks/{task_id}", headers=auth, **kwargs)
    assert_validation_error(response)
    assert response.json()["detail"][0]["loc"][0] == "path"
    assert await db_count(app) == count
    assert await db_row(app, existing["id"]) == before


BAD_QUERIES: dict[str, dict[str, str]] = {
    "page-0": {"page": "0"},
    "page-negative": {"page": "-1"},
    "page-text": {"page": "x"},
    "page-float": {"page": "1.5"},
    "page-empty": {"page": ""},
    "page-huge": {"page": str(10**12)},
    "page-beyond-int64": {"page": "9" * 40},
    "page_size-0": {"page_size": "0"},
    "page_size-101": {"page_size": "101"},
    "page_size-negative": {"page_size": "-5"},
    "page_size-text": {"page_size": "ten"},
    "page_size-huge": {"page_size": str(10**12)},
    "status-unknown": {"status": "done"},
    "status-wrong-case": {"status": "PENDING"},
}


@pytest.mark.parametrize("as_admin", [False, True], ids=["user", "admin"])
@pytest.mark.parametrize("params", list(BAD_QUERIES.values()), ids=list(BAD_QUERIES))
async def test_bad_list_query_is_422(
    client: httpx.AsyncClient,
    alice: dict[str, str],
    admin: dict[str, str],
    existing: dict[str, Any],
    params: dict[str, str],
    as_admin: bool,
) -> None:
    response = await client.get("/tasks", params=params, headers=admin if as_admin else alice)
    assert_validation_error(response)
    assert response.json()["detail"][0]["loc"][0] == "query"


# --- injection-looking text ---------------------------------------------------------------

SQLISH = [
    "'; DROP TABLE tasks; --",
    "Robert'); DELETE FROM tasks WHERE ('1'='1",
    "1 OR 1=1",
    "%' OR title LIKE '%",
    "$$; TRUNCATE tasks; $$",
    "\\x00\\'",
]


@pytest.mark.parametrize("value", SQLISH)
async def test_sql_looking_text_is_stored_verbatim(
    client: httpx.AsyncClient,
    app: FastAPI,
    alice: dict[str, str],
    existing: dict[str, Any],
    value: str,
) -> None:
    created = await client.post(
        "/tasks", json={"title": value, "description": value}, headers=alice
    )
    assert created.status_code == 201, created.text
    assert created.json()["title"] == value
    assert created.json()["description"] == value
    row = await db_row(app, created.json()["id"])
    assert row is not None
    assert (row["title"], row["description"]) == (value, value)
    # The table and the other row are intact.
    assert await db_count(app) == 2
    assert await db_row(app, existing["id"]) is not None
    read = await client.get(f"/tasks/{created.json()['id']}", headers=alice)
    assert read.json()["title"] == value


@pytest.mark.parametrize("owner", ["' OR '1'='1", "alice' --", "%", "_lice"])
async def test_sql_looking_owner_filter_matches_nothing(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    existing: dict[str, Any],
    owner: str,
) -> None:
    response = await client.get("/tasks", params={"owner": owner}, headers=admin)
    assert response.status_code == 200
    assert response.json()["total"] == 0
    assert response.json()["items"] == []


@pytest.mark.parametrize("owner", ["%00", "a%00b", "alice%00"])
async def test_nul_byte_in_owner_filter_is_422(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    existing: dict[str, Any],
    owner: str,
) -> None:
    # PostgreSQL text cannot hold NUL: it must be refused as input, not reach the driver.
    response = await client.get(f"/tasks?owner={owner}", headers=admin)
    assert_validation_error(response)
    assert response.json()["detail"][0]["loc"][:2] == ["query", "owner"]


async def test_unknown_query_parameters_are_ignored_on_every_route(
    client: httpx.AsyncClient, alice: dict[str, str], oidc: OIDCProvider
) -> None:
    """The same rule everywhere: a parameter a route does not know changes nothing."""
    unknown = {"foo": "1", "owner_id": "bob", "limit": "1", "'; DROP TABLE tasks; --": "x"}
    created = await client.post("/tasks", params=unknown, json={"title": "a"}, headers=alice)
    assert created.status_code == 201
    task = f"/tasks/{created.json()['id']}"
    listed = await client.get("/tasks", params=unknown, headers=alice)
    assert listed.status_code == 200
    assert listed.json()["total"] == 1
    assert listed.json()["page_size"] == 10  # "limit" is not an alias of page_size
    assert (await client.get(task, params=unknown, headers=alice)).status_code == 200
    patched = await client.patch(task, params=unknown, json={"title": "b"}, headers=alice)
    assert patched.json()["title"] == "b"
    admin = oidc.auth("root", roles=["admin"])
    assert (await client.delete(task, params=unknown, headers=admin)).status_code == 204


async def test_the_documented_patch_body_refuses_what_the_api_refuses(
    client: httpx.AsyncClient,
) -> None:
    # The schema used to offer {} and null title/status, which are 422 (found by `make fuzz`).
    schema = (await client.get("/openapi.json")).json()
    update = schema["components"]["schemas"]["TaskUpdate"]
    assert update["minProperties"] == 1
    assert update["additionalProperties"] is False
    properties = update["properties"]
    assert properties["title"]["type"] == "string"
    assert properties["status"] == {"$ref": "#/components/schemas/TaskStatus", "title": "Status"}
    assert "default" not in properties["title"]
    assert {"type": "null"} in properties["description"]["anyOf"]  # null clears it


async def test_the_documented_strings_refuse_nul_and_blank_titles(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    # A NUL (or a title of whitespace alone) is a 422; the schema now says so with a pattern,
    # so a client validating against it agrees with the API (found by `make fuzz`).
    schema = (await client.get("/openapi.json")).json()
    create = schema["components"]["schemas"]["TaskCreate"]["properties"]
    title = create["title"]["pattern"]
    description = create["description"]["anyOf"][0]["pattern"]
    owner = next(
        p["schema"]["anyOf"][0]["pattern"]
        for p in schema["paths"]["/tasks"]["get"]["parameters"]
        if p["name"] == "owner"
    )
    for pattern, refused in [(title, "a\x00b"), (title, " \t "), (description, "a\x00"),
                             (owner, "\x00")]:  # fmt: skip
        assert re.search(pattern, refused) is None, (pattern, refused)
    for pattern, accepted in [(title, " x "), (title, "é😀"), (description, ""), (owner, "bob")]:
        assert re.search(pattern, accepted), (pattern, accepted)
    for body in ({"title": "a\x00b"}, {"title": " \t "}, {"title": "x", "description": "\x00"}):
        assert_validation_error(await client.post("/tasks", json=body, headers=alice))
