"""Every route against every kind of caller, as one table: who gets what, and that a refused
change leaves the task as it was (no reading or changing another owner's task by its id)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from testing.oidc import OIDCProvider, new_rsa_key
from tests.fixtures.tasks import create, db_row

FORGING_KEY = new_rsa_key()

# The task under test belongs to alice.
CALLERS = ("no token", "expired token", "forged token", "no role", "owner", "other user", "admin")


def _headers(oidc: OIDCProvider, caller: str) -> dict[str, str]:
    past = int(time.time()) - 3600
    tokens = {
        "no token": None,
        "expired token": lambda: oidc.token("alice", exp=past, iat=past - 600),
        # Signed with a key the provider never published, under its signing kid, as admin.
        "forged token": lambda: oidc.token("alice", ["admin"], key=FORGING_KEY),
        "no role": lambda: oidc.token("alice", []),
        "owner": lambda: oidc.token("alice"),
        "other user": lambda: oidc.token("bob"),
        "admin": lambda: oidc.token("root", ["admin"]),
    }
    make = tokens[caller]
    return {} if make is None else {"Authorization": f"Bearer {make()}"}


# (method, path, body) -> expected status per caller, in the order of CALLERS.
MATRIX: list[tuple[str, str, dict[str, Any] | None, tuple[int, ...]]] = [
    ("POST", "/tasks", {"title": "new"}, (401, 401, 401, 403, 201, 201, 201)),
    ("GET", "/tasks", None, (401, 401, 401, 403, 200, 200, 200)),
    ("GET", "/tasks?owner=alice", None, (401, 401, 401, 403, 200, 403, 200)),
    ("GET", "/tasks/{id}", None, (401, 401, 401, 403, 200, 404, 200)),
    ("PATCH", "/tasks/{id}", {"title": "changed"}, (401, 401, 401, 403, 200, 404, 200)),
    ("DELETE", "/tasks/{id}", None, (401, 401, 401, 403, 403, 403, 204)),
    ("GET", "/metrics", None, (401, 401, 401, 403, 200, 200, 200)),
    ("GET", "/healthz", None, (200,) * 7),
    ("GET", "/readyz", None, (200,) * 7),
    ("GET", "/openapi.json", None, (200,) * 7),
]
CASES = [
    pytest.param(method, path, body, caller, expected, id=f"{method} {path} as {caller}")
    for method, path, body, statuses in MATRIX
    for caller, expected in zip(CALLERS, statuses, strict=True)
]


@pytest.mark.parametrize(("method", "path", "body", "caller", "expected"), CASES)
async def test_authorization_matrix(
    client: httpx.AsyncClient,
    app: FastAPI,
    oidc: OIDCProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    caller: str,
    expected: int,
) -> None:
    task = await create(client, oidc.auth("alice"), title="alice's task")
    before = await db_row(app, task["id"])

    response = await client.request(
        method, path.format(id=task["id"]), json=body, headers=_headers(oidc, caller)
    )

    assert response.status_code == expected, response.text
    if expected == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if expected == 404:
        assert response.json() == {"detail": "Task not found", "code": "task_not_found"}
    if expected >= 400 or method in ("GET", "POST"):
        assert await db_row(app, task["id"]) == before  # refused (or a read): unchanged
    if method == "GET" and path == "/tasks" and expected == 200:
        ids = [item["id"] for item in response.json()["items"]]
        assert (task["id"] in ids) == (caller in ("owner", "admin"))
    if expected == 200 and path == "/tasks/{id}" and method == "GET":
        assert response.json() == task
