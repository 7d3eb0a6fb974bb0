"""deploy/keycloak/realm.json against the service as deploy/compose.yml configures it.

These tests read the realm and check every value the API depends on, and build the access
token Keycloak would issue from the realm's own mappers and put it through the API's real
verifier; tests/interop/test_keycloak.py imports the same file into the real Keycloak.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest

from taskapp.auth.jwks import SigningKey, StaticKeySource
from taskapp.auth.principal import Role
from taskapp.auth.tokens import TokenVerifier
from testing.oidc import new_rsa_key, public_jwk
from tests.deploy.stack import (
    compose,
    env_example,
    filled_env,
    published_ports,
    realm,
)

# Keycloak's HTTP port inside its container (KC_HTTP_PORT's default).
KEYCLOAK_HTTP_PORT = 8080
SWAGGER_REDIRECT_PATH = "/docs/oauth2-redirect"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return compose(filled_env())


@pytest.fixture(scope="module")
def api_env(stack: dict[str, Any]) -> dict[str, str]:
    environment: dict[str, str] = stack["services"]["api"]["environment"]
    return environment


@pytest.fixture(scope="module")
def keycloak_env(stack: dict[str, Any]) -> dict[str, str]:
    environment: dict[str, str] = stack["services"]["keycloak"]["environment"]
    return environment


def clients() -> dict[str, dict[str, Any]]:
    return {client["clientId"]: client for client in realm()["clients"]}


def token_clients() -> list[dict[str, Any]]:
    """Clients people or scripts get tokens from (any flow that issues a user's token)."""
    return [
        client
        for client in realm()["clients"]
        if client.get("standardFlowEnabled") or client.get("directAccessGrantsEnabled")
    ]


def users() -> dict[str, dict[str, Any]]:
    return {user["username"]: user for user in realm()["users"]}


# --- issuer and discovery ------------------------------------------------------------------


def test_the_api_expects_the_issuer_keycloak_puts_in_its_tokens(
    api_env: dict[str, str], keycloak_env: dict[str, str]
) -> None:
    # Keycloak (hostname v2) names the realm {KC_HOSTNAME}/realms/{realm} in every token.
    issuer = f"{keycloak_env['KC_HOSTNAME']}/realms/{realm()['realm']}"
    assert api_env["TASKAPP_OIDC_ISSUER"] == issuer
    assert realm()["realm"] == "taskapp"
    assert realm()["enabled"] is True


def test_the_public_issuer_is_keycloaks_published_port(
    stack: dict[str, Any], keycloak_env: dict[str, str]
) -> None:
    hostname = urlsplit(keycloak_env["KC_HOSTNAME"])
    assert hostname.hostname == "localhost"
    assert published_ports(stack["services"]["keycloak"]) == [
        ("127.0.0.1", hostname.port, KEYCLOAK_HTTP_PORT)
    ]


def test_the_api_reads_discovery_inside_the_network(
    stack: dict[str, Any], api_env: dict[str, str], keycloak_env: dict[str, str]
) -> None:
    assert "keycloak" in stack["services"]
    assert api_env["TASKAPP_OIDC_DISCOVERY_URL"] == (
        f"http://keycloak:{KEYCLOAK_HTTP_PORT}/realms/{realm()['realm']}"
        "/.well-known/openid-configuration"
    )
    # The discovery document asked for at that address names the public issuer and internal
    # JWKS (backchannel) URLs only with these two settings.
    assert keycloak_env["KC_HOSTNAME"].startswith("http://")  # a full URL, as dynamic needs
    assert keycloak_env["KC_HOSTNAME_BACKCHANNEL_DYNAMIC"] == "true"
    assert keycloak_env["KC_HTTP_ENABLED"] == "true"


def test_keycloak_runs_in_production_mode_and_imports_the_realm(stack: dict[str, Any]) -> None:
    keycloak = stack["services"]["keycloak"]
    assert keycloak["command"] == ["start", "--import-realm"]
    # Relative to deploy/, where the compose file is: deploy/keycloak/realm.json.
    assert keycloak["volumes"] == [
        "./keycloak/realm.json:/opt/keycloak/data/import/taskapp-realm.json:ro"
    ]
    environment = keycloak["environment"]
    assert environment["KC_DB"] == "postgres"
    assert environment["KC_DB_URL"] == "jdbc:postgresql://postgres:5432/keycloak"
    assert environment["KC_HEALTH_ENABLED"] == "true"


# --- roles, clients, mappers ---------------------------------------------------------------


def test_the_realm_defines_the_roles_the_api_knows() -> None:
    names = {role["name"] for role in realm()["roles"]["realm"]}
    assert {role.value for role in Role} <= names


def test_the_api_client_is_the_audience_and_signs_nobody_in(api_env: dict[str, str]) -> None:
    api = clients()[api_env["TASKAPP_OIDC_AUDIENCE"]]
    assert api["bearerOnly"] is True
    for flow in (
        "standardFlowEnabled",
        "implicitFlowEnabled",
        "directAccessGrantsEnabled",
        "serviceAccountsEnabled",
    ):
        assert api[flow] is False, flow


def test_the_swagger_client_is_public_with_pkce_and_redirects_to_docs_behind_nginx(
    stack: dict[str, Any], api_env: dict[str, str]
) -> None:
    swagger = clients()[api_env["TASKAPP_OIDC_SWAGGER_CLIENT_ID"]]
    assert swagger["publicClient"] is True
    assert swagger["standardFlowEnabled"] is True
    assert swagger["implicitFlowEnabled"] is False
    assert swagger["directAccessGrantsEnabled"] is False
    assert swagger["attributes"]["pkce.code.challenge.method"] == "S256"
    # /docs is reached through nginx's published port; the browser may call it either name.
    ((_, port, _),) = published_ports(stack["services"]["nginx"])
    origins = {f"http://localhost:{port}", f"http://127.0.0.1:{port}"}
    assert set(swagger["redirectUris"]) == {origin + SWAGGER_REDIRECT_PATH for origin in origins}
    # The browser exchanges the code for tokens itself: CORS from the same origins.
    assert set(swagger["webOrigins"]) == origins


def test_a_client_issues_tokens_with_the_password_grant_for_curl() -> None:
    (cli,) = [client for client in realm()["clients"] if client.get("directAccessGrantsEnabled")]
    assert cli["clientId"] == "taskapp-cli"
    assert cli["publicClient"] is True
    assert cli["standardFlowEnabled"] is False
    assert cli["implicitFlowEnabled"] is False
    assert not cli["redirectUris"]


def mappers(client: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    return [m for m in client.get("protocolMappers", []) if m["protocolMapper"] == kind]


@pytest.mark.parametrize("client", token_clients(), ids=lambda c: c["clientId"])
def test_tokens_carry_the_audience_roles_and_email_the_verifier_reads(
    client: dict[str, Any], api_env: dict[str, str]
) -> None:
    (audience,) = mappers(client, "oidc-audience-mapper")
    assert audience["config"]["included.client.audience"] == api_env["TASKAPP_OIDC_AUDIENCE"]
    assert audience["config"]["access.token.claim"] == "true"

    (roles,) = mappers(client, "oidc-usermodel-realm-role-mapper")
    # taskapp.auth.tokens reads realm_access.roles (and the audience's client roles).
    assert roles["config"]["claim.name"] == "realm_access.roles"
    assert roles["config"]["multivalued"] == "true"
    assert roles["config"]["access.token.claim"] == "true"
    assert client["fullScopeAllowed"] is True  # every realm role of the user, not a subset

    email = [
        m
        for kind in ("oidc-usermodel-attribute-mapper", "oidc-usermodel-property-mapper")
        for m in mappers(client, kind)
        if m["config"]["claim.name"] == "email"
    ]
    assert len(email) == 1
    assert email[0]["config"]["user.attribute"] == "email"
    assert email[0]["config"]["access.token.claim"] == "true"

    # Keycloak's built-in scope `basic` puts `sub` (required by the verifier) into access
    # tokens since Keycloak 25; `roles` and `email` would duplicate the mappers above.
    scopes = set(client["defaultClientScopes"])
    assert "basic" in scopes
    assert not scopes & {"roles", "email"}


# --- demo users ----------------------------------------------------------------------------


def test_demo_users_have_their_role_and_an_email_address() -> None:
    demo = users()
    assert set(demo) == {"alice", "admin"}
    assert demo["alice"]["realmRoles"] == [Role.USER.value]
    assert demo["admin"]["realmRoles"] == [Role.ADMIN.value]
    for user in demo.values():
        assert user["enabled"] is True
        assert user["email"].endswith("@example.com")  # a reserved domain: never a real inbox
        assert user["emailVerified"] is True


def test_demo_passwords_come_from_the_env_file(keycloak_env: dict[str, str]) -> None:
    for user in users().values():
        (credential,) = user["credentials"]
        assert credential["type"] == "password"
        assert credential["temporary"] is False
        # Keycloak resolves ${NAME} placeholders from its environment while importing.
        match = re.fullmatch(r"\$\{(\w+)\}", credential["value"])
        assert match, f"{user['username']}'s password is committed"
        name = match.group(1)
        assert name in env_example()
        assert env_example()[name] == ""
        assert keycloak_env[name] == filled_env()[name]


# --- the token Keycloak would issue, through the API's verifier ------------------------------


def _set_claim(claims: dict[str, Any], path: str, value: Any) -> None:
    """Keycloak's nested claim names: "realm_access.roles" is {"realm_access": {"roles": ..}}."""
    *parents, leaf = path.split(".")
    for part in parents:
        claims = claims.setdefault(part, {})
    claims[leaf] = value


def keycloak_access_token_claims(
    client: Mapping[str, Any], user: Mapping[str, Any], issuer: str
) -> dict[str, Any]:
    """The claims of an access token for `user` from `client`, following the realm's mappers.

    Only what Keycloak adds by itself is written here: the registered claims, `typ`, `azp`,
    `sub` (scope `basic`) and `preferred_username` (scope `profile`). A mapper this function
    does not know fails the test rather than being skipped.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "iss": issuer,
        "sub": str(uuid.uuid4()),
        "typ": "Bearer",
        "azp": client["clientId"],
        "preferred_username": user["username"],
    }
    for mapper in client["protocolMappers"]:
        config = mapper["config"]
        if config.get("access.token.claim") != "true":
            continue
        kind = mapper["protocolMapper"]
        if kind == "oidc-audience-mapper":
            claims.setdefault("aud", []).append(config["included.client.audience"])
        elif kind == "oidc-usermodel-realm-role-mapper":
            _set_claim(claims, config["claim.name"], list(user["realmRoles"]))
        elif kind in ("oidc-usermodel-attribute-mapper", "oidc-usermodel-property-mapper"):
            _set_claim(claims, config["claim.name"], user[config["user.attribute"]])
        else:
            raise AssertionError(f"unknown mapper {kind} in {client['clientId']}")
    return claims


@pytest.mark.parametrize("client", token_clients(), ids=lambda c: c["clientId"])
@pytest.mark.parametrize(("username", "role"), [("alice", Role.USER), ("admin", Role.ADMIN)])
async def test_the_api_accepts_the_realms_tokens_with_the_users_role(
    client: dict[str, Any], username: str, role: Role, api_env: dict[str, str]
) -> None:
    key = new_rsa_key()
    jwk = jwt.PyJWK(public_jwk(key, "realm-key"))
    verifier = TokenVerifier(
        StaticKeySource({"realm-key": SigningKey(jwk, "RS256")}),
        issuer=api_env["TASKAPP_OIDC_ISSUER"],
        audience=api_env["TASKAPP_OIDC_AUDIENCE"],
        leeway=0,
    )
    user = users()[username]
    claims = keycloak_access_token_claims(client, user, api_env["TASKAPP_OIDC_ISSUER"])
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "realm-key"})

    principal = await verifier.verify(token)

    assert principal.subject == claims["sub"]
    assert role in principal.roles
    assert principal.is_admin is (role is Role.ADMIN)
    assert principal.email == user["email"]
    assert principal.username == username
