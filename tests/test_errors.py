"""Every error answers `{"detail", "code"}` with a code from the one list, and the OpenAPI
document and docs/errors.md name every code there is."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskapp.errors import AppError, every_code
from testing.oidc import OIDCProvider

ROOT = Path(__file__).resolve().parents[1]


def _codes() -> set[str]:
    return {kind.code for kind in every_code()}


async def _openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def test_every_code_is_one_kind_of_failure() -> None:
    kinds = every_code()
    assert len({kind.code for kind in kinds}) == len(kinds)
    for kind in kinds:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", kind.code), kind.code
        assert 400 <= kind.status_code < 600, kind
        assert kind.summary, kind
    with pytest.raises(TypeError, match="taken"):

        class Twin(AppError):  # a second class may not take a code
            code = "task_not_found"


@pytest.mark.parametrize(
    ("request_args", "status", "code"),
    [
        ({"method": "GET", "url": "/tasks"}, 401, "not_authenticated"),
        ({"method": "GET", "url": "/tasks", "headers": {"Authorization": "Bearer x"}}, 401,
         "token_invalid"),
        ({"method": "GET", "url": "/nowhere"}, 404, "not_found"),
        ({"method": "PUT", "url": "/tasks"}, 405, "method_not_allowed"),
        ({"method": "POST", "url": "/tasks", "content": b"\xff\xfe{",
          "headers": {"Content-Type": "application/json"}}, 400, "malformed_body"),
        ({"method": "POST", "url": "/tasks", "content": b"x" * 300_000}, 413, "body_too_large"),
        ({"method": "GET", "url": "/tasks?page=0"}, 422, "validation_failed"),
        ({"method": "GET", "url": f"/tasks/{uuid.uuid4()}"}, 404, "task_not_found"),
        ({"method": "DELETE", "url": f"/tasks/{uuid.uuid4()}"}, 403, "forbidden"),
    ],
)  # fmt: skip
async def test_each_error_body_carries_its_code(
    client: httpx.AsyncClient,
    oidc: OIDCProvider,
    request_args: dict[str, Any],
    status: int,
    code: str,
) -> None:
    headers = {"Authorization": oidc.auth("alice")["Authorization"]}
    if "Authorization" in request_args.get("headers", {}) or status == 401:
        headers = {}
    headers.update(request_args.pop("headers", {}))
    response = await client.request(**request_args, headers=headers)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert body["code"] == code
    assert code in _codes()


async def test_the_openapi_document_lists_every_code(client: httpx.AsyncClient) -> None:
    spec = await _openapi(client)
    schema = spec["components"]["schemas"]["ErrorResponse"]
    assert set(schema["required"]) == {"detail", "code"}
    listed = set(schema["properties"]["code"]["enum"])
    assert listed == _codes() - {"validation_failed"}
    for kind in every_code():
        assert f"`{kind.code}`" in spec["info"]["description"], kind.code


async def test_each_task_operation_names_the_codes_of_each_status(
    client: httpx.AsyncClient,
) -> None:
    spec = await _openapi(client)
    read_one = spec["paths"]["/tasks/{task_id}"]["get"]["responses"]
    examples = read_one["404"]["content"]["application/json"]["examples"]
    assert examples["task_not_found"]["value"] == {
        "detail": "Task not found",
        "code": "task_not_found",
    }
    assert "`task_not_found`" in read_one["404"]["description"]
    unavailable = read_one["503"]["content"]["application/json"]["examples"]
    assert {"database_unavailable", "database_busy", "identity_provider_unavailable"} <= set(
        unavailable
    )
    create = spec["paths"]["/tasks"]["post"]["responses"]
    assert "outcome_unknown" in create["503"]["content"]["application/json"]["examples"]
    assert (
        "outcome_unknown"
        not in (
            spec["paths"]["/tasks"]["get"]["responses"]["503"]["content"]["application/json"][
                "examples"
            ]
        )
    )


def test_the_error_reference_names_every_code() -> None:
    reference = (ROOT / "docs" / "errors.md").read_text()
    for kind in every_code():
        assert f"| {kind.status_code} | `{kind.code}` |" in reference, kind.code
