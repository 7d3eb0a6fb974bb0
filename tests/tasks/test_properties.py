"""Properties over generated data, against the real API and database: pages partition what
an owner may see, and a PATCH changes exactly the fields it sends."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any

import httpx
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from taskapp.tasks.schemas import TaskUpdate
from testing.oidc import OIDCProvider
from tests.fixtures.tasks import db_row

STATUSES = ("pending", "in_progress", "completed")
# Each example makes real requests: few, but every one reaches PostgreSQL and Redis.
EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    # The client fixture is shared by the examples: each example uses an owner of its own.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# Text PostgreSQL can store: no NUL, no lone surrogates (both are refused with a 422).
stored_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=40,
)
titles = stored_text.filter(lambda t: t.strip() != "")


def _newest_first(item: dict[str, Any]) -> tuple[datetime, str]:
    return datetime.fromisoformat(item["created_at"]), item["id"]


@EXAMPLES
@given(
    statuses=st.lists(st.sampled_from(STATUSES), max_size=25),
    page_size=st.integers(min_value=1, max_value=10),
    status_filter=st.none() | st.sampled_from(STATUSES),
)
async def test_pages_partition_the_owners_tasks(
    client: httpx.AsyncClient,
    oidc: OIDCProvider,
    statuses: list[str],
    page_size: int,
    status_filter: str | None,
) -> None:
    owner = oidc.auth(f"pages-{uuid.uuid4()}")
    created = []
    for number, status in enumerate(statuses):
        response = await client.post(
            "/tasks", json={"title": f"task {number}", "status": status}, headers=owner
        )
        assert response.status_code == 201
        created.append(response.json())
    expected = [t for t in created if status_filter in (None, t["status"])]

    seen: list[dict[str, Any]] = []
    pages = max(1, math.ceil(len(expected) / page_size))
    for page in range(1, pages + 2):  # one page past the end
        params: dict[str, Any] = {"page": page, "page_size": page_size}
        if status_filter:
            params["status"] = status_filter
        response = await client.get("/tasks", params=params, headers=owner)
        assert response.status_code == 200
        body = response.json()
        assert body["total"] == len(expected)
        assert (body["page"], body["page_size"]) == (page, page_size)
        remaining = max(0, len(expected) - (page - 1) * page_size)
        assert len(body["items"]) == min(page_size, remaining)
        seen += body["items"]

    ids = [item["id"] for item in seen]
    assert len(ids) == len(set(ids)), "a task on two pages"
    assert sorted(ids) == sorted(t["id"] for t in expected), "a task missing, or a stranger"
    assert seen == sorted(seen, key=_newest_first, reverse=True)
    assert seen == sorted(expected, key=_newest_first, reverse=True)


patches = st.fixed_dictionaries(
    {},
    optional={
        "title": titles,
        "description": st.none() | stored_text,
        "status": st.sampled_from(STATUSES),
    },
).filter(bool)


@EXAMPLES
@given(
    title=titles,
    description=st.none() | stored_text,
    status=st.sampled_from(STATUSES),
    patch=patches,
)
# Python's str.strip() would drop "\x1f"; the API keeps it (not Unicode White_Space).
@example(title="a", description=None, status="pending", patch={"title": "0\x1f"})
async def test_patch_changes_only_the_fields_it_sends(
    client: httpx.AsyncClient,
    app: FastAPI,
    oidc: OIDCProvider,
    title: str,
    description: str | None,
    status: str,
    patch: dict[str, Any],
) -> None:
    owner = oidc.auth(f"patch-{uuid.uuid4()}")
    original = await client.post(
        "/tasks",
        json={"title": title, "description": description, "status": status},
        headers=owner,
    )
    assert original.status_code == 201
    before = original.json()

    response = await client.patch(f"/tasks/{before['id']}", json=patch, headers=owner)

    assert response.status_code == 200, response.text
    after = response.json()
    # As stored: a title without surrounding white space, by the API's own rule (Unicode
    # White_Space, which is not Python's str.strip: "\x1f" stays).
    sent = TaskUpdate.model_validate(patch).changes()
    unchanged = {"id", "owner", "title", "description", "status", "created_at"} - set(sent)
    assert {k: after[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert {k: after[k] for k in sent} == sent
    assert datetime.fromisoformat(after["updated_at"]) >= datetime.fromisoformat(
        before["updated_at"]
    )
    stored = await db_row(app, before["id"])
    assert stored is not None
    assert {k: stored[k] for k in ("title", "description", "status")} == {
        k: after[k] for k in ("title", "description", "status")
    }
    read = await client.get(f"/tasks/{before['id']}", headers=owner)
    assert read.json() == after  # and no stale cached copy
