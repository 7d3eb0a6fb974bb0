"""taskapp against the real Keycloak (its distribution from Maven Central, see
`testing/keycloak.py`), with deploy/keycloak/realm.json imported as Compose imports it.

Every token here is issued by Keycloak itself. Keycloak runs with `--hostname` set to its
public address (`http://localhost:PORT`) and a dynamic backchannel, as in Compose: tokens
name the public issuer, and the API reads discovery at the internal address
(`http://127.0.0.1:PORT`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from taskapp.app import create_app
from testing.keycloak import CACHE, Keycloak, locked
from testing.polling import eventually
from testing.processes import clean_env, running_server
from testing.services import free_port
from tests.conftest import SettingsFactory, app_state, running

pytestmark = [pytest.mark.slow, pytest.mark.keycloak]

AUDIENCE = "taskapp-api"


@contextlib.asynccontextmanager
async def taskapp_for(
    make_settings: SettingsFactory, keycloak: Keycloak, **oidc: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app (cold key cache) trusting the realm as Compose configures it."""
    settings = {
        "issuer": keycloak.issuer(),
        "discovery_url": keycloak.discovery_url(),
        "audience": AUDIENCE,
        **oidc,
    }
    app = create_app(make_settings(oidc_=settings))
    async with running(app) as client:
        yield app, client


def serve_env(
    keycloak: Keycloak, work: Path, database_url: str, redis_url: str, **extra: str
) -> dict[str, str]:
    """The environment of a `taskapp serve` trusting the realm as Compose configures it."""
    return clean_env(
        TASKAPP_DATA_DIR=str(work),
        TASKAPP_DATABASE_URL=database_url,
        TASKAPP_REDIS_URL=redis_url,
        TASKAPP_OIDC_ISSUER=keycloak.issuer(),
        TASKAPP_OIDC_DISCOVERY_URL=keycloak.discovery_url(),
        TASKAPP_OIDC_AUDIENCE=AUDIENCE,
        **extra,
    )


def recipients(database_url: str, task_id: str) -> list[str | None]:
    """Where the creation e-mail of a task is to go, as the outbox recorded it."""
    import psycopg

    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT d.target FROM events e JOIN deliveries d ON d.event_id = e.id"
            " WHERE e.aggregate_id = %s AND d.consumer = 'email'",
            (task_id,),
        ).fetchall()
    return [row[0] for row in rows]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def assert_refused(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401, response.text
    code = "token_expired" if detail == "Token expired" else "token_invalid"
    assert response.json() == {"detail": detail, "code": code}
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


# --- 1. the realm ---------------------------------------------------------------------------


def test_the_realm_imports_without_warnings(keycloak: Keycloak) -> None:
    log = keycloak.log_text()
    assert "Realm 'taskapp' imported" in log, log[-4000:]
    assert "Referenced client scope" not in log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors == []
    # The realm as the file describes it.
    realm = keycloak.admin_request("GET", "/taskapp").json()
    assert realm["passwordPolicy"] == "length(12) and notUsername"
    clients = keycloak.admin_request("GET", "/taskapp/clients").json()
    assert {"taskapp-api", "taskapp-cli", "taskapp-swagger"} <= {c["clientId"] for c in clients}


# --- 2. real tokens, end to end -------------------------------------------------------------


def test_tokens_carry_the_roles_subject_and_address_the_api_reads(keycloak: Keycloak) -> None:
    users = {u["username"]: u for u in keycloak.admin_request("GET", "/taskapp/users").json()}
    for username, role in (("alice", "user"), ("admin", "admin")):
        token = keycloak.token(username)
        claims = claims_of(token)
        assert jwt.get_unverified_header(token)["alg"] == "RS256"
        assert claims["iss"] == keycloak.issuer()
        assert AUDIENCE in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
        assert claims["typ"] == "Bearer"
        assert claims["azp"] == "taskapp-cli"
        assert claims["sub"] == users[username]["id"]
        assert role in claims["realm_access"]["roles"]
        assert claims["email"] == f"{username}@example.com"
        assert claims["email_verified"] is True


def test_the_task_contract_holds_with_real_tokens(
    keycloak: Keycloak, tmp_path: Path, database_url: str, redis_url: str
) -> None:
    """`taskapp serve` pointed at the real issuer: CRUD as alice, the admin's reach."""
    env = serve_env(keycloak, tmp_path, database_url, redis_url)
    alice, admin = keycloak.token("alice"), keycloak.token("admin")
    alice_id = claims_of(alice)["sub"]
    port = free_port()
    with (
        running_server(["serve", "--workers", "1"], env, port, tmp_path),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as api,
    ):
        created = api.post("/tasks", json={"title": "From Keycloak"}, headers=bearer(alice))
        assert created.status_code == 201, created.text
        task = created.json()
        assert task["owner"] == alice_id
        # The creation e-mail goes to the verified address Keycloak put in the token.
        assert recipients(database_url, task["id"]) == ["alice@example.com"]
        path = f"/tasks/{task['id']}"

        listed = api.get("/tasks", headers=bearer(alice)).json()
        assert [item["id"] for item in listed["items"]] == [task["id"]]
        assert api.get(path, headers=bearer(alice)).json()["title"] == "From Keycloak"
        patched = api.patch(path, json={"status": "completed"}, headers=bearer(alice))
        assert patched.status_code == 200, patched.text
        assert patched.json()["status"] == "completed"

        # Deleting is the admin's; the admin sees every owner's task.
        refused = api.delete(path, headers=bearer(alice))
        assert refused.status_code == 403, refused.text
        assert api.get(path, headers=bearer(admin)).json()["owner"] == alice_id
        assert api.delete(path, headers=bearer(admin)).status_code == 204
        assert api.get(path, headers=bearer(alice)).status_code == 404

        # Without a token, or with a token of nobody's: refused.
        assert api.get("/tasks").status_code == 401
        assert_refused(api.get("/tasks", headers=bearer(alice[:-4] + "AAAA")), "Invalid token")


# --- 3. one issuer, two addresses ------------------------------------------------------------


async def test_discovery_at_the_internal_address_serves_the_public_issuer(
    make_settings: SettingsFactory, keycloak: Keycloak
) -> None:
    discovery = keycloak.get("/realms/taskapp/.well-known/openid-configuration")
    assert discovery["issuer"] == keycloak.issuer()
    # Backchannel URLs follow the address asked: the API fetches keys internally.
    assert discovery["jwks_uri"].startswith(keycloak.internal_url)
    async with taskapp_for(make_settings, keycloak) as (_, client):
        response = await client.get("/tasks", headers=bearer(keycloak.token("alice")))
        assert response.status_code == 200, response.text


async def test_an_issuer_keycloak_does_not_name_is_a_503_that_says_so(
    make_settings: SettingsFactory, keycloak: Keycloak
) -> None:
    # The internal address configured as the issuer: Keycloak still names its public one.
    internal_issuer = f"{keycloak.internal_url}/realms/taskapp"
    async with taskapp_for(make_settings, keycloak, issuer=internal_issuer) as (_, client):
        response = await client.get("/tasks", headers=bearer(keycloak.token("alice")))
    assert response.status_code == 503, response.text
    assert response.json() == {
        "detail": "The identity provider's discovery document names another issuer than "
        f"TASKAPP_OIDC_ISSUER ({internal_issuer}); the API's log says which",
        "code": "identity_provider_misconfigured",
    }


# --- 5. tokens that are not for us ---------------------------------------------------------


def client_id_of(keycloak: Keycloak, client_id: str) -> str:
    [client] = keycloak.admin_request(
        "GET", "/taskapp/clients", params={"clientId": client_id}
    ).json()
    return str(client["id"])


def add_client(keycloak: Keycloak, client_id: str, attributes: dict[str, str]) -> None:
    """A public client with the password grant whose tokens carry our audience."""
    response = keycloak.admin_request(
        "POST",
        "/taskapp/clients",
        json={
            "clientId": client_id,
            "publicClient": True,
            "directAccessGrantsEnabled": True,
            "standardFlowEnabled": False,
            "attributes": attributes,
            "protocolMappers": [
                {
                    "name": "audience taskapp-api",
                    "protocol": "openid-connect",
                    "protocolMapper": "oidc-audience-mapper",
                    "config": {
                        "included.client.audience": AUDIENCE,
                        "access.token.claim": "true",
                    },
                }
            ],
        },
    )
    assert response.status_code in (201, 409), response.text


async def test_tokens_not_meant_for_the_api_are_refused(
    make_settings: SettingsFactory, keycloak: Keycloak
) -> None:
    grant = keycloak.token_response("alice", scope="openid")
    # account-console signs people in to their account page (authorization code only);
    # the password grant is turned on here just to get one of its tokens.
    console = client_id_of(keycloak, "account-console")
    representation = keycloak.admin_request("GET", f"/taskapp/clients/{console}").json()
    representation["directAccessGrantsEnabled"] = True
    updated = keycloak.admin_request("PUT", f"/taskapp/clients/{console}", json=representation)
    assert updated.status_code == 204, updated.text
    master_token = keycloak.token(
        keycloak.admin[0], password=keycloak.admin[1], client_id="admin-cli", realm="master"
    )
    refused = {
        "the ID token": (grant["id_token"], "Token audience not accepted"),
        # Keycloak signs refresh tokens with the realm's HMAC key.
        "the refresh token": (grant["refresh_token"], "Unsupported token algorithm"),
        # admin-cli's tokens are lightweight: no `sub`, no `aud`.
        "a token of admin-cli": (
            keycloak.token("alice", client_id="admin-cli"),
            "Token lacks the 'sub' claim",
        ),
        "a token of account-console": (
            keycloak.token("alice", client_id="account-console"),
            "Token audience not accepted",
        ),
        # Signed by the master realm's key, which the taskapp realm does not publish.
        "a token of another realm": (master_token, "Unknown signing key"),
    }
    assert claims_of(grant["id_token"])["typ"] == "ID"
    assert claims_of(grant["refresh_token"])["typ"] == "Refresh"
    async with taskapp_for(make_settings, keycloak) as (_, client):
        for name, (token, detail) in refused.items():
            response = await client.get("/tasks", headers=bearer(token))
            assert response.status_code == 401, f"{name}: {response.text}"
            assert_refused(response, detail)


async def test_an_expired_token_is_refused(
    make_settings: SettingsFactory, keycloak: Keycloak
) -> None:
    add_client(keycloak, "taskapp-short-lived", {"access.token.lifespan": "1"})
    token = keycloak.token("alice", client_id="taskapp-short-lived")
    claims = claims_of(token)
    assert claims["exp"] - claims["iat"] == 1
    async with taskapp_for(make_settings, keycloak, leeway=0) as (_, client):
        await asyncio.sleep(max(0.0, claims["exp"] + 1.1 - time.time()))
        assert_refused(await client.get("/tasks", headers=bearer(token)), "Token expired")


async def test_a_lightweight_access_token_is_refused(
    make_settings: SettingsFactory, keycloak: Keycloak
) -> None:
    """Keycloak's lightweight access tokens leave out the claims the API needs (Keycloak
    expects the resource server to introspect them): a clean 401, never a 500."""
    add_client(
        keycloak, "taskapp-lightweight", {"client.use.lightweight.access.token.enabled": "true"}
    )
    token = keycloak.token("alice", client_id="taskapp-lightweight")
    claims = claims_of(token)
    assert {"aud", "sub", "realm_access"}.isdisjoint(claims), claims
    async with taskapp_for(make_settings, keycloak) as (_, client):
        response = await client.get("/tasks", headers=bearer(token))
    assert_refused(response, "Token lacks the 'sub' claim")


# --- 6. Swagger UI's login through Keycloak, in a real browser ------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NPM = shutil.which("npm")
# The Swagger UI FastAPI's /docs loads (from a CDN a browser here cannot reach; the test
# serves the same files from npm's package of them).
SWAGGER_UI_CDN = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"
SWAGGER_UI_VERSION = "5.36.0"
SWAGGER_UI_CACHE = CACHE.parent / f"swagger-ui-dist-{SWAGGER_UI_VERSION}"


def swagger_ui_files() -> Path:
    """swagger-ui-dist from npm (a 5.x, as the CDN path names), installed once under the
    cache directory."""
    package = SWAGGER_UI_CACHE / "node_modules" / "swagger-ui-dist"
    with locked(CACHE.parent / ".swagger-ui.lock"):
        if not (package / "swagger-ui-bundle.js").is_file():
            assert NPM is not None
            SWAGGER_UI_CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [NPM, "install", "--no-audit", "--no-fund", "--prefix", str(SWAGGER_UI_CACHE),
                 f"swagger-ui-dist@{SWAGGER_UI_VERSION}"],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
    return package


def page_text(page: Any) -> str:
    """A page's address and the end of its text, for a failure's message; never raising
    (the page may have closed or still be loading)."""
    try:
        return f"page {page.url}:\n{page.inner_text('body', timeout=2_000)[-2000:]}"
    except Exception as exc:
        return f"page {page.url}: unreadable ({type(exc).__name__})"


def allow_swagger_redirect(keycloak: Keycloak, origin: str) -> None:
    """The deployment's own address among the Swagger client's redirect URIs and web
    origins, as whoever serves the API elsewhere than port 8000 sets them."""
    client_uuid = client_id_of(keycloak, "taskapp-swagger")
    path = f"/taskapp/clients/{client_uuid}"
    client = keycloak.admin_request("GET", path).json()
    client["redirectUris"] = [*client["redirectUris"], f"{origin}/docs/oauth2-redirect"]
    client["webOrigins"] = [*client["webOrigins"], origin]
    assert keycloak.admin_request("PUT", path, json=client).status_code == 204


@pytest.mark.skipif(
    CHROMIUM is None or NPM is None, reason="needs Debian's chromium and npm on PATH"
)
def test_swagger_ui_logs_in_through_keycloak_and_calls_the_api(
    keycloak: Keycloak, tmp_path: Path, database_url: str, redis_url: str
) -> None:
    from playwright.sync_api import Route, sync_playwright

    files = swagger_ui_files()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    allow_swagger_redirect(keycloak, origin)
    env = serve_env(
        keycloak, tmp_path, database_url, redis_url,
        TASKAPP_OIDC_SWAGGER_CLIENT_ID="taskapp-swagger",
    )  # fmt: skip

    def serve_swagger_ui(route: Route) -> None:
        name = route.request.url.removeprefix(SWAGGER_UI_CDN)
        kind = "text/css" if name.endswith(".css") else "application/javascript"
        route.fulfill(body=(files / name).read_bytes(), content_type=kind)

    authorizations: list[dict[str, str]] = []
    seen: list[str] = []  # what the browser reported, for a failure's message
    with (
        running_server(["serve", "--workers", "1"], env, port, tmp_path),
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context()
        try:
            context.on("console", lambda message: seen.append(f"console: {message.text}"))
            context.on(
                "requestfailed",
                lambda request: seen.append(
                    f"failed: {request.method} {request.url} {request.failure}"
                ),
            )
            context.on(
                "response",
                lambda response: seen.append(f"{response.status} {response.url[:120]}"),
            )
            page = context.new_page()
            page.route(f"{SWAGGER_UI_CDN}**", serve_swagger_ui)
            page.route("https://fastapi.tiangolo.com/**", lambda route: route.abort())
            page.on(
                "request",
                lambda request: (
                    authorizations.append(dict(request.headers))
                    if request.url.startswith(f"{origin}/tasks")
                    else None
                ),
            )
            page.goto(f"{origin}/docs")
            # The Authorize dialog lists the schemes as resolved when it opens; the OIDC one
            # is resolved once Swagger UI has read Keycloak's discovery document.
            page.wait_for_function(
                "() => ui.authSelectors.definitionsToAuthorize().some(d => d.has('oidc'))",
                timeout=30_000,
            )
            page.locator("button.authorize").first.click()
            oidc = page.locator(".auth-container", has_text="authorization_code with PKCE")
            with page.expect_popup() as popup_info:
                oidc.locator("button.authorize").click()
            login = popup_info.value
            login.wait_for_load_state()
            # Keycloak's own login page, at the public address.
            assert login.url.startswith(f"{keycloak.issuer()}/protocol/openid-connect/auth")
            assert "code_challenge_method=S256" in login.url
            login.fill("#username", "alice")
            login.fill("#password", keycloak.passwords["alice"])
            # Listening before the click: the popup may close before the click returns.
            with login.expect_event("close", timeout=30_000):
                login.click("#kc-login", no_wait_after=True)
            oidc.locator("button", has_text="Logout").wait_for(timeout=10_000)
            page.locator(".modal-ux button.close-modal").click()

            operation = page.locator(".opblock-get", has=page.locator("[data-path='/tasks']"))
            operation.locator(".opblock-summary").first.click()
            operation.locator("button.try-out__btn").click()
            operation.locator("button.execute").click()
            status = operation.locator(".live-responses-table tbody .response-col_status").first
            status.wait_for(timeout=10_000)
            assert status.inner_text().strip().startswith("200")
        except Exception as error:
            log = "\n".join([*seen[-60:], *map(page_text, context.pages)])
            raise AssertionError(f"{error}\n--- the browser saw:\n{log}") from error
        finally:
            browser.close()
    # The call from /docs carried the token Keycloak issued to the Swagger client for alice.
    [headers] = authorizations
    token = headers["authorization"].removeprefix("Bearer ")
    claims = claims_of(token)
    assert (claims["azp"], claims["preferred_username"]) == ("taskapp-swagger", "alice")
    assert claims["iss"] == keycloak.issuer()


# --- 4. key rotation (last: it changes the realm's keys) -----------------------------------


def realm_keys(keycloak: Keycloak) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = keycloak.admin_request("GET", "/taskapp/keys").json()["keys"]
    return keys


def set_key_provider(keycloak: Keycloak, component_id: str, **config: str) -> None:
    path = f"/taskapp/components/{component_id}"
    component = keycloak.admin_request("GET", path).json()
    component["config"].update({name: [value] for name, value in config.items()})
    response = keycloak.admin_request("PUT", path, json=component)
    assert response.status_code == 204, response.text


async def test_key_rotation(make_settings: SettingsFactory, keycloak: Keycloak) -> None:
    old_token = keycloak.token("alice")
    old_kid = jwt.get_unverified_header(old_token)["kid"]
    [old_key] = [k for k in realm_keys(keycloak) if k["kid"] == old_kid]
    realm_id = keycloak.admin_request("GET", "/taskapp").json()["id"]
    ttl = 2.0
    async with taskapp_for(
        make_settings, keycloak, jwks_cache_ttl=ttl, jwks_refetch_cooldown=0
    ) as (_, client):
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200

        # A new RSA key of higher priority: Keycloak signs with it from now on.
        added = keycloak.admin_request(
            "POST",
            "/taskapp/components",
            json={
                "name": f"rotated-{uuid.uuid4().hex[:8]}",
                "providerId": "rsa-generated",
                "providerType": "org.keycloak.keys.KeyProvider",
                "parentId": realm_id,
                "config": {
                    "priority": [str(old_key["providerPriority"] + 100)],
                    "keySize": ["2048"],
                    "active": ["true"],
                    "enabled": ["true"],
                    "algorithm": ["RS256"],
                },
            },
        )
        assert added.status_code == 201, added.text
        new_token = keycloak.token("alice")
        new_kid = jwt.get_unverified_header(new_token)["kid"]
        assert new_kid != old_kid
        # Accepted at once: the unknown kid makes the API fetch the keys again.
        response = await client.get("/tasks", headers=bearer(new_token))
        assert response.status_code == 200, response.text

        # The old key, passive: Keycloak signs nothing new with it but still publishes it.
        set_key_provider(keycloak, old_key["providerId"], active="false")
        assert jwt.get_unverified_header(keycloak.token("alice"))["kid"] == new_kid
        async with taskapp_for(make_settings, keycloak) as (_, fresh):
            response = await fresh.get("/tasks", headers=bearer(old_token))
            assert response.status_code == 200, response.text

        # The old key, disabled: it leaves the JWKS, and its tokens are refused once the
        # API's keys are older than the TTL (even those it had verified and remembered).
        set_key_provider(keycloak, old_key["providerId"], enabled="false")
        published = keycloak.get("/realms/taskapp/protocol/openid-connect/certs")
        assert old_kid not in {key["kid"] for key in published["keys"]}
        assert (await client.get("/tasks", headers=bearer(old_token))).status_code == 200
        await asyncio.sleep(ttl + 0.2)

        async def old_token_refused() -> bool:
            response = await client.get("/tasks", headers=bearer(old_token))
            return response.status_code == 401

        await eventually(old_token_refused, "the disabled key's token refused", within=5)
        assert_refused(await client.get("/tasks", headers=bearer(old_token)), "Unknown signing key")
        response = await client.get("/tasks", headers=bearer(new_token))
        assert response.status_code == 200, response.text


@pytest.fixture(autouse=True)
async def _tasks_removed(keycloak: Keycloak, make_settings: SettingsFactory) -> AsyncIterator[None]:
    yield
    app = create_app(make_settings())
    async with running(app), app_state(app).engine.begin() as connection:
        await connection.execute(text("DELETE FROM tasks"))
