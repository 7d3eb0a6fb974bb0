"""Every project route, and every task route on a project's task, against every kind of
caller: who gets what, and that a refused change leaves everything as it was."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from testing.oidc import OIDCProvider
from tests.fixtures.projects import everything, project, seen_by_directory, share

# Alice owns the project; vic is a viewer, ed an editor, ada a project admin; nora is a
# member of nothing; root is a global admin; "no token" sends none.
CALLERS = ("no token", "non-member", "viewer", "editor", "project admin", "owner", "admin")
SUBJECTS = {
    "non-member": "nora",
    "viewer": "vic",
    "editor": "ed",
    "project admin": "ada",
    "owner": "alice",
    "admin": "root",
}

# (method, path, body) -> expected status per caller, in the order of CALLERS. {p} is the
# project, {t} a task in it (assigned to vic), {m} a member (vic).
MATRIX: list[tuple[str, str, dict[str, Any] | None, tuple[int, ...]]] = [
    ("GET", "/projects/{p}", None, (401, 404, 200, 200, 200, 200, 200)),
    ("PATCH", "/projects/{p}", {"name": "renamed"}, (401, 404, 403, 403, 200, 200, 200)),
    ("PATCH", "/projects/{p}", {"archived": True}, (401, 404, 403, 403, 200, 200, 200)),
    ("DELETE", "/projects/{p}", None, (401, 404, 403, 403, 403, 204, 204)),
    ("GET", "/projects/{p}/members", None, (401, 404, 200, 200, 200, 200, 200)),
    ("PUT", "/projects/{p}/members/nora", {"role": "viewer"}, (401, 404, 403, 403, 200, 200, 200)),
    ("PUT", "/projects/{p}/members/{m}", {"role": "editor"}, (401, 404, 403, 403, 200, 200, 200)),
    ("DELETE", "/projects/{p}/members/ed", None, (401, 404, 403, 204, 204, 204, 204)),
    ("POST", "/projects/{p}/transfer", {"owner": "ed"}, (401, 404, 403, 403, 403, 200, 403)),
    ("GET", "/tasks?project={p}", None, (401, 404, 200, 200, 200, 200, 200)),
    ("GET", "/tasks/{t}", None, (401, 404, 200, 200, 200, 200, 200)),
    ("POST", "/tasks", {"title": "new", "project_id": "{p}"}, (401, 404, 403, 201, 201, 201, 201)),
    ("PATCH", "/tasks/{t}", {"title": "changed"}, (401, 404, 403, 200, 200, 200, 200)),
    ("PATCH", "/tasks/{t}", {"assignees": ["ed"]}, (401, 404, 403, 200, 200, 200, 200)),
    ("PATCH", "/tasks/{t}", {"assignees": ["nora"]}, (401, 404, 403, 422, 422, 422, 422)),
    ("DELETE", "/tasks/{t}", None, (401, 403, 403, 403, 403, 403, 204)),
]
CASES = [
    pytest.param(method, path, body, caller, expected, id=f"{method} {path} {body} as {caller}")
    for method, path, body, statuses in MATRIX
    for caller, expected in zip(CALLERS, statuses, strict=True)
]


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {key: _fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_fill(item, names) for item in value]
    return value


@pytest.mark.parametrize(("method", "path", "body", "caller", "expected"), CASES)
async def test_project_authorization_matrix(
    client: httpx.AsyncClient,
    app: FastAPI,
    oidc: OIDCProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    caller: str,
    expected: int,
) -> None:
    auth = {name: oidc.auth(sub) for name, sub in SUBJECTS.items()}
    auth["admin"] = oidc.auth("root", roles=["admin"])
    await seen_by_directory(client, *auth.values())
    owner = auth["owner"]
    project_id = await project(client, owner)
    for member, role in (("vic", "viewer"), ("ed", "editor"), ("ada", "admin")):
        await share(client, owner, project_id, member, role)
    made = await client.post(
        "/tasks",
        json={"title": "shared", "project_id": project_id, "assignees": ["vic"]},
        headers=owner,
    )
    assert made.status_code == 201, made.text
    names = {"p": project_id, "t": made.json()["id"], "m": "vic"}
    before = await everything(app)

    headers = {} if caller == "no token" else auth[caller]
    response = await client.request(
        method, _fill(path, names), json=_fill(body, names), headers=headers
    )

    assert response.status_code == expected, response.text
    if expected >= 400:
        assert await everything(app) == before, "a refused request changed something"
    if expected == 404:
        # Its existence is not revealed: the same answer as for no such thing at all.
        assert response.json()["code"] in {"project_not_found", "task_not_found"}
    if expected == 422:
        problem = response.json()["detail"][0]
        assert problem["type"] == "not_a_member"
        assert problem["loc"] == ["body", "assignees", 0]
