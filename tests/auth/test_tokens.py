"""The bearer-token attack matrix, through the HTTP API of the shared app.

Every rejected token must get the same answer: 401, `WWW-Authenticate: Bearer
error="invalid_token"` and `{"detail": <str>}`; never a 500, on any route.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI
from sqlalchemy import text

from taskapp.app import create_app
from testing.oidc import AUDIENCE, OIDCProvider, new_rsa_key
from tests.conftest import SettingsFactory, app_state, client_of, running

INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token"'

# One foreign key for the whole module: generating RSA keys is the slow part.
FOREIGN_KEY = new_rsa_key()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign(
    provider: OIDCProvider,
    claims: dict[str, Any],
    *,
    kid: Any = None,
    key: Any = None,
    algorithm: str = "RS256",
) -> str:
    """`claims` signed like the provider would, with any of kid, key, algorithm swapped.

    Signed by hand rather than with `jwt.encode`, which refuses malformed headers
    (a numeric kid) that an attacker is free to send.
    """
    header = {
        "alg": algorithm,
        "typ": "JWT",
        "kid": kid if kid is not None else provider.signing_kid,
    }
    signing_key = key if key is not None else provider.keys[provider.signing_kid]
    signing_input = f"{b64url_json(header)}.{b64url_json(claims)}"
    signature = jwt.get_algorithm_by_name(algorithm).sign(signing_input.encode(), signing_key)
    return f"{signing_input}.{b64url(signature)}"


def without(claims: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in claims.items() if name not in names}


def unsigned_token(provider: OIDCProvider) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": provider.signing_kid}
    return f"{b64url_json(header)}.{b64url_json(provider.claims())}."


def hs256_with_public_key(provider: OIDCProvider) -> str:
    """The classic key-confusion attack: HMAC 'signed' with the public RSA key as secret."""
    public_pem = (
        provider.keys[provider.signing_kid]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": provider.signing_kid}
    signing_input = f"{b64url_json(header)}.{b64url_json(provider.claims())}"
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def now() -> int:
    return int(time.time())


TokenFactory = Callable[[OIDCProvider], str]

# Tokens the API must refuse with 401 invalid_token. The shared app uses a leeway of 30 s.
INVALID_TOKENS: dict[str, TokenFactory] = {
    "expired": lambda p: sign(p, p.claims(exp=now() - 3600, iat=now() - 7200)),
    "expired-beyond-leeway": lambda p: sign(p, p.claims(exp=now() - 120)),
    "nbf-in-future": lambda p: sign(p, p.claims(nbf=now() + 3600, exp=now() + 7200)),
    "iat-in-future": lambda p: sign(p, p.claims(iat=now() + 3600, exp=now() + 7200)),
    "missing-exp": lambda p: sign(p, without(p.claims(), "exp")),
    "missing-iat": lambda p: sign(p, without(p.claims(), "iat")),
    "exp-not-a-number": lambda p: sign(p, p.claims(exp="tomorrow")),
    "wrong-issuer": lambda p: sign(p, p.claims(iss="http://evil.example/realms/taskapp")),
    "issuer-with-trailing-slash": lambda p: sign(p, p.claims(iss=p.issuer + "/")),
    "other-realm-same-host": lambda p: sign(
        p, p.claims(iss=p.issuer.replace("/realms/taskapp", "/realms/other"))
    ),
    "missing-issuer": lambda p: sign(p, without(p.claims(), "iss")),
    "wrong-audience": lambda p: sign(p, p.claims(aud=["account"], azp="taskapp-cli")),
    "wrong-audience-string": lambda p: sign(p, p.claims(aud="other-api", azp="other-api")),
    # azp names the client the token was issued to: without our aud it is not for us.
    "azp-is-the-api-aud-account-only": lambda p: sign(p, p.claims(aud=["account"], azp=AUDIENCE)),
    "azp-is-the-api-no-aud": lambda p: sign(p, without(p.claims(azp=AUDIENCE), "aud")),
    "missing-audience": lambda p: sign(p, without(p.claims(), "aud")),
    "audience-is-a-lookalike": lambda p: sign(p, p.claims(aud=["taskapp-api-x"])),
    "alg-none": unsigned_token,
    "alg-none-with-signature": lambda p: unsigned_token(p) + b64url(b"not-a-signature"),
    "hs256-with-public-key-as-secret": hs256_with_public_key,
    "ps256-with-rs256-key": lambda p: sign(p, p.claims(), algorithm="PS256"),
    "foreign-key-with-known-kid": lambda p: sign(p, p.claims(), key=FOREIGN_KEY),
    "unknown-kid": lambda p: sign(p, p.claims(), kid=uuid.uuid4().hex, key=FOREIGN_KEY),
    "kid-is-a-number": lambda p: sign(p, p.claims(), kid=12345),
    "kid-is-a-list": lambda p: sign(p, p.claims(), kid=[p.signing_kid]),
    "tampered-payload": lambda p: tamper(sign(p, p.claims(sub="alice")), sub="mallory"),
    "signature-stripped": lambda p: sign(p, p.claims()).rsplit(".", 1)[0] + ".",
    "id-token": lambda p: sign(p, p.claims(typ="ID")),
    "refresh-token": lambda p: sign(p, p.claims(typ="Refresh")),
    "typ-is-not-a-string": lambda p: sign(p, p.claims(typ=["Bearer"])),
    "missing-sub": lambda p: sign(p, without(p.claims(), "sub")),
    "empty-sub": lambda p: sign(p, p.claims(sub="")),
    "numeric-sub": lambda p: sign(p, {**p.claims(), "sub": 42}),
    "overlong-sub": lambda p: sign(p, p.claims(sub="a" * 256)),
    "empty-string": lambda p: "",
    "abc": lambda p: "abc",
    "a.b.c": lambda p: "a.b.c",
    "two-dots-only": lambda p: "..",
    "random-base64": lambda p: base64.b64encode(os.urandom(96)).decode(),
    "random-base64url-segments": lambda p: ".".join(b64url(os.urandom(48)) for _ in range(3)),
    "header-not-json": lambda p: f"{b64url(b'not json')}.{b64url_json(p.claims())}.sig",
    "header-is-a-list": lambda p: f"{b64url_json(['alg'])}.{b64url_json(p.claims())}.sig",
    "20kb-string": lambda p: "a" * 20_000,
    "20kb-valid-looking-token": lambda p: sign(p, p.claims(padding="x" * 20_000)),
}

# Non-ASCII cannot be sent as a str header value; it goes as raw UTF-8 bytes.
NON_ASCII_TOKENS = ["ünïcødé", "токен.токен.токен", "🔑" * 10]


def tamper(token: str, **claims: Any) -> str:
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64url_json({**decoded, **claims})}.{signature}"


@pytest.fixture(scope="module")
async def _tasks_removed_after_module(app: FastAPI) -> AsyncIterator[None]:
    yield
    async with app_state(app).engine.begin() as connection:
        await connection.execute(text("TRUNCATE tasks"))
    await app_state(app).cache.clear()


@pytest.fixture
def api(app: FastAPI, _tasks_removed_after_module: None) -> httpx.AsyncClient:
    """The shared app's client, for tests that must not write: one clean-up per module.

    (Truncating after each of the ~200 requests here would triple the module's run time.)
    """
    return client_of(app)


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], str)
    assert body["detail"]
    expected = "token_expired" if body["detail"] == "Token expired" else "token_invalid"
    assert body["code"] == expected


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert body["code"] == "forbidden"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- accepted tokens ---------------------------------------------------------------------


async def test_valid_user_token_is_accepted(api: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    response = await api.get("/tasks", headers=oidc.auth("alice"))
    assert response.status_code == 200, response.text
    assert "www-authenticate" not in response.headers


# Tokens the API must accept, though they differ from the usual Keycloak access token.
VALID_TOKENS: dict[str, TokenFactory] = {
    "aud-plain-string": lambda p: sign(p, p.claims(aud=AUDIENCE)),
    "aud-single-item-list": lambda p: sign(p, p.claims(aud=[AUDIENCE])),
    "expired-within-leeway": lambda p: sign(p, p.claims(exp=now() - 5)),
    "no-typ-claim": lambda p: sign(p, without(p.claims(), "typ")),
    # The token type is compared as RFC 6750 compares the scheme: without regard to case.
    "typ-lower-case": lambda p: sign(p, p.claims(typ="bearer")),
    "typ-upper-case": lambda p: sign(p, p.claims(typ="BEARER")),
}


@pytest.mark.parametrize("make_token", VALID_TOKENS.values(), ids=VALID_TOKENS.keys())
async def test_token_variants_are_accepted(
    api: httpx.AsyncClient, oidc: OIDCProvider, make_token: TokenFactory
) -> None:
    response = await api.get("/tasks", headers=bearer(make_token(oidc)))
    assert response.status_code == 200, response.text


async def test_azp_only_audience_is_accepted_when_allowed(
    make_settings: SettingsFactory, oidc: OIDCProvider
) -> None:
    token = sign(oidc, oidc.claims(aud=["account"], azp=AUDIENCE))
    app = create_app(make_settings(oidc_={"accept_azp_audience": True}))
    async with running(app) as client:
        response = await client.get("/tasks", headers=bearer(token))
        assert response.status_code == 200, response.text
        # Still not a token of another client for another audience.
        other = sign(oidc, oidc.claims(aud=["account"], azp="taskapp-cli"))
        assert_invalid_token(await client.get("/tasks", headers=bearer(other)))


async def test_scheme_name_is_case_insensitive(api: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    response = await api.get("/tasks", headers={"Authorization": f"bearer {oidc.token()}"})
    assert response.status_code == 200, response.text


# --- rejected tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("make_token", INVALID_TOKENS.values(), ids=INVALID_TOKENS.keys())
async def test_invalid_token_is_rejected(
    api: httpx.AsyncClient, oidc: OIDCProvider, make_token: TokenFactory
) -> None:
    response = await api.get("/tasks", headers=bearer(make_token(oidc)))
    assert_invalid_token(response)


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "iss"])
async def test_a_missing_claim_is_named(
    api: httpx.AsyncClient, oidc: OIDCProvider, claim: str
) -> None:
    response = await api.get("/tasks", headers=bearer(sign(oidc, without(oidc.claims(), claim))))
    assert_invalid_token(response)
    assert response.json()["detail"] == f"Token lacks the {claim!r} claim"


@pytest.mark.parametrize("token", NON_ASCII_TOKENS)
async def test_non_ascii_token_is_rejected(api: httpx.AsyncClient, token: str) -> None:
    response = await api.get(
        "/tasks", headers={b"Authorization": b"Bearer " + token.encode("utf-8")}
    )
    assert_invalid_token(response)


async def test_rejection_details_do_not_echo_the_token(
    api: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    token = sign(oidc, oidc.claims(exp=now() - 3600, iat=now() - 7200))
    response = await api.get("/tasks", headers=bearer(token))
    assert_invalid_token(response)
    assert token not in response.text
    assert token.split(".")[1] not in response.text


async def test_no_authorization_header_gets_a_bare_challenge(api: httpx.AsyncClient) -> None:
    response = await api.get("/tasks")
    assert response.status_code == 401
    # RFC 6750 3.1: no credentials at all means no error code in the challenge.
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], str)
    assert body["code"] == "not_authenticated"


@pytest.mark.parametrize(
    "authorization",
    ["Basic YWxpY2U6c2VjcmV0", "Digest username=alice", "Token abc", "Bearertoken"],
)
async def test_other_authorization_schemes_are_rejected(
    api: httpx.AsyncClient, authorization: str
) -> None:
    response = await api.get("/tasks", headers={"Authorization": authorization})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], str)
    assert body["code"] == "not_authenticated"


# --- roles -------------------------------------------------------------------------------


async def test_token_without_user_or_admin_role_is_forbidden(
    api: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    response = await api.get("/tasks", headers=oidc.auth("alice", roles=()))
    assert_forbidden(response)


async def test_unknown_roles_are_forbidden(api: httpx.AsyncClient, oidc: OIDCProvider) -> None:
    response = await api.get("/tasks", headers=oidc.auth("alice", roles=("User", "admins")))
    assert_forbidden(response)


async def test_role_in_api_client_roles_is_accepted(
    api: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    token = oidc.token(
        "alice",
        roles=(),
        resource_access={AUDIENCE: {"roles": ["user"]}, "account": {"roles": ["view-profile"]}},
    )
    response = await api.get("/tasks", headers=bearer(token))
    assert response.status_code == 200, response.text


async def test_role_in_another_clients_roles_is_forbidden(
    api: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    token = oidc.token(
        "alice",
        roles=(),
        resource_access={"account": {"roles": ["user", "admin"]}},
    )
    response = await api.get("/tasks", headers=bearer(token))
    assert_forbidden(response)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"realm_access": {"roles": "user"}}, id="realm-roles-a-string"),
        pytest.param({"realm_access": ["user"]}, id="realm-access-a-list"),
        pytest.param({"realm_access": {"roles": [["user"]]}}, id="realm-roles-nested"),
        pytest.param({"resource_access": {AUDIENCE: ["user"]}}, id="client-access-a-list"),
        pytest.param({"resource_access": "user"}, id="resource-access-a-string"),
    ],
)
async def test_malformed_role_claims_are_forbidden_not_500(
    api: httpx.AsyncClient, oidc: OIDCProvider, claims: dict[str, Any]
) -> None:
    overrides = {"realm_access": {"roles": []}, **claims}
    response = await api.get("/tasks", headers=bearer(oidc.token("alice", roles=(), **overrides)))
    assert_forbidden(response)


async def test_delete_with_user_role_is_forbidden(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    auth = oidc.auth("alice", roles=("user",))
    created = await client.post("/tasks", json={"title": "keep me"}, headers=auth)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]

    response = await client.delete(f"/tasks/{task_id}", headers=auth)
    assert_forbidden(response)
    still_there = await client.get(f"/tasks/{task_id}", headers=auth)
    assert still_there.status_code == 200


async def test_delete_with_admin_role_from_client_roles_is_allowed(
    client: httpx.AsyncClient, oidc: OIDCProvider
) -> None:
    created = await client.post("/tasks", json={"title": "remove me"}, headers=oidc.auth("alice"))
    assert created.status_code == 201, created.text
    admin = bearer(oidc.token("root", roles=(), resource_access={AUDIENCE: {"roles": ["admin"]}}))

    response = await client.delete(f"/tasks/{created.json()['id']}", headers=admin)
    assert response.status_code == 204, response.text


# --- every route ------------------------------------------------------------------------

TASK_ID = "0b5f3a52-6c1e-4c53-9f0e-2f7f7a3d9c11"
ROUTES = [
    pytest.param("POST", "/tasks", {"title": "x"}, id="POST-/tasks"),
    pytest.param("GET", "/tasks", None, id="GET-/tasks"),
    pytest.param("GET", "/tasks?page=0&page_size=1000", None, id="GET-/tasks-bad-query"),
    pytest.param("GET", f"/tasks/{TASK_ID}", None, id="GET-/tasks/id"),
    pytest.param("GET", "/tasks/not-a-uuid", None, id="GET-/tasks/bad-id"),
    pytest.param("PATCH", f"/tasks/{TASK_ID}", {"status": "done"}, id="PATCH-/tasks/id"),
    pytest.param("PATCH", f"/tasks/{TASK_ID}", {}, id="PATCH-/tasks/id-empty-body"),
    pytest.param("DELETE", f"/tasks/{TASK_ID}", None, id="DELETE-/tasks/id"),
]
ROUTE_TOKENS = [
    "expired",
    "nbf-in-future",
    "wrong-issuer",
    "wrong-audience",
    "alg-none",
    "hs256-with-public-key-as-secret",
    "foreign-key-with-known-kid",
    "unknown-kid",
    "kid-is-a-number",
    "id-token",
    "missing-sub",
    "missing-exp",
    "a.b.c",
    "20kb-string",
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize("token_name", ROUTE_TOKENS)
async def test_every_route_rejects_bad_tokens_with_401(
    api: httpx.AsyncClient,
    oidc: OIDCProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    token_name: str,
) -> None:
    token = INVALID_TOKENS[token_name](oidc)
    response = await api.request(method, path, json=body, headers=bearer(token))
    # Authentication comes before input validation: a stranger learns nothing about inputs.
    assert_invalid_token(response)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_requires_a_token(
    api: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = await api.request(method, path, json=body)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_route_requires_a_role(
    api: httpx.AsyncClient,
    oidc: OIDCProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    response = await api.request(method, path, json=body, headers=oidc.auth(roles=()))
    assert_forbidden(response)
