"""Interoperability: taskapp against a real OpenID Connect provider, panva/oidc-provider.

The other auth tests mint tokens with our own fixture provider, so they can only show that
taskapp accepts what we *think* a provider issues. Here a real implementation (run by Node,
see oidc_provider/server.mjs) serves its own discovery document and JWKS and issues RS256 JWT
access tokens (RFC 9068, header typ "at+jwt") through the client_credentials grant with a
resource indicator (RFC 8707) whose audience is "taskapp-api", plus Keycloak-like claims
(realm_access.roles, typ "Bearer", azp). For client_credentials, sub is the client id.

Needs node and npm on PATH (skipped otherwise); installs the pinned provider with `npm ci`
when oidc_provider/node_modules is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from taskapp.app import create_app
from tests.conftest import SettingsFactory, app_state, running

pytestmark = pytest.mark.slow

NODE = shutil.which("node")
NPM = shutil.which("npm")
if NODE is None or NPM is None:
    pytest.skip(
        "the real-provider interop test needs `node` and `npm` on PATH "
        f"(node: {NODE or 'missing'}, npm: {NPM or 'missing'})",
        allow_module_level=True,
    )

logger = logging.getLogger(__name__)

PROVIDER_DIR = Path(__file__).parent / "oidc_provider"
AUDIENCE = "taskapp-api"
# Resource indicators (absolute URIs) the provider maps to audiences; see server.mjs.
TASKAPP_RESOURCE = "urn:taskapp:api"  # aud "taskapp-api", JWT
OTHER_RESOURCE = "urn:other:api"  # aud "other-api", JWT
OPAQUE_RESOURCE = "urn:opaque:api"  # aud "opaque-api", opaque reference token
# Clients of server.mjs: client id -> secret; the first has realm role "user", the other none.
USER_CLIENT = ("taskapp-worker", "worker-secret")
NO_ROLE_CLIENT = ("reporting-job", "reporting-secret")

READY_TIMEOUT = 15.0
NPM_CI_TIMEOUT = 300.0


@dataclass
class RealProvider:
    """The running oidc-provider: its issuer and the requests it has served so far."""

    issuer: str
    process: subprocess.Popen[str]
    stderr_path: Path
    npm_ci_seconds: float | None
    requests: list[dict[str, Any]] = field(default_factory=list)

    def served(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, path, status) of the requests served, from the `since`-th on."""
        return [(r["method"], r["path"], r["status"]) for r in list(self.requests)[since:]]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def discovery(self) -> dict[str, Any]:
        """The provider's discovery document."""
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{self.issuer}/.well-known/openid-configuration")
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    async def token_response(
        self, client: tuple[str, str], resource: str | None = TASKAPP_RESOURCE
    ) -> httpx.Response:
        form = {"grant_type": "client_credentials"}
        if resource is not None:
            form["resource"] = resource
        token_endpoint = (await self.discovery())["token_endpoint"]
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.post(token_endpoint, data=form, auth=client)

    async def token(
        self, client: tuple[str, str] = USER_CLIENT, resource: str | None = TASKAPP_RESOURCE
    ) -> str:
        """An access token from the provider's token endpoint (client_credentials grant)."""
        response = await self.token_response(client, resource)
        assert response.status_code == 200, f"{response.text}\n{self.stderr()}"
        body = response.json()
        assert body["token_type"] == "Bearer", body
        token: str = body["access_token"]
        return token


def ensure_node_modules() -> float | None:
    """`npm ci` when the provider is not installed yet; its duration in seconds, or None."""
    if (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return None
    started = time.monotonic()
    result = subprocess.run(
        [str(NPM), "ci", "--no-audit", "--no-fund"],
        cwd=PROVIDER_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        pytest.fail(
            f"`npm ci` in {PROVIDER_DIR} failed ({result.returncode}) after {elapsed:.1f}s:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    logger.warning("npm ci for the oidc-provider interop test took %.1fs", elapsed)
    return elapsed


def _read_stdout(
    process: subprocess.Popen[str], ready: list[dict[str, Any]], requests: list[dict[str, Any]]
) -> None:
    """Collect the provider's JSON-lines stdout: the ready record, then one per request."""
    assert process.stdout is not None
    for line in process.stdout:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "ready":
            ready.append(record)
        elif record.get("event") == "request":
            requests.append(record)


@pytest.fixture(scope="module")
def real_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealProvider]:
    npm_ci_seconds = ensure_node_modules()
    stderr_path = tmp_path_factory.mktemp("oidc-provider") / "stderr.log"
    ready: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [str(NODE), "server.mjs", "0"],
            cwd=PROVIDER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    reader = threading.Thread(
        target=_read_stdout, args=(process, ready, requests), daemon=True, name="oidc-provider"
    )
    reader.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready:
            if process.poll() is not None:
                pytest.fail(
                    f"oidc-provider exited ({process.returncode}) before it was ready:\n"
                    + stderr_path.read_text(errors="replace")
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"oidc-provider not ready within {READY_TIMEOUT}s:\n"
                    + stderr_path.read_text(errors="replace")
                )
            time.sleep(0.02)
        yield RealProvider(
            issuer=ready[0]["issuer"],
            process=process,
            stderr_path=stderr_path,
            npm_ci_seconds=npm_ci_seconds,
            requests=requests,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)


@contextlib.asynccontextmanager
async def taskapp_for(
    make_settings: SettingsFactory, provider: RealProvider
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A fresh app (cold JWKS cache) trusting the real provider; its tasks removed after."""
    app = create_app(make_settings(oidc_={"issuer": provider.issuer, "audience": AUDIENCE}))
    async with running(app) as client:
        try:
            yield app, client
        finally:
            async with app_state(app).engine.begin() as connection:
                await connection.execute(
                    text("DELETE FROM tasks WHERE owner IN (:a, :b)"),
                    {"a": USER_CLIENT[0], "b": NO_ROLE_CLIENT[0]},
                )


@pytest.fixture
async def app_client(
    make_settings: SettingsFactory, real_provider: RealProvider
) -> AsyncIterator[httpx.AsyncClient]:
    async with taskapp_for(make_settings, real_provider) as (_, client):
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_invalid_token(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 401, response.text
    code = "token_expired" if detail == "Token expired" else "token_invalid"
    assert response.json() == {"detail": detail, "code": code}
    assert response.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')


# --- what the provider issues ---------------------------------------------------------------


async def test_provider_issues_keycloak_like_jwt_access_tokens(real_provider: RealProvider) -> None:
    """Pin the token shape the other tests rely on, so a provider upgrade that changes it
    shows up here rather than as a puzzling 401."""
    token = await real_provider.token()
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "RS256"
    assert header["typ"] == "at+jwt"  # RFC 9068, where Keycloak says "JWT"
    assert isinstance(header["kid"], str)
    assert claims["iss"] == real_provider.issuer
    assert claims["aud"] == AUDIENCE  # a string, where Keycloak sends a list
    assert claims["sub"] == USER_CLIENT[0]
    assert claims["client_id"] == USER_CLIENT[0]
    assert claims["typ"] == "Bearer"
    assert "user" in claims["realm_access"]["roles"]
    assert claims["exp"] > claims["iat"]


# --- taskapp accepting and refusing the provider's tokens ------------------------------------


async def test_app_fetches_the_providers_discovery_document_and_jwks(
    make_settings: SettingsFactory, real_provider: RealProvider
) -> None:
    token = await real_provider.token()
    discovery = await real_provider.discovery()
    assert discovery["issuer"] == real_provider.issuer
    async with httpx.AsyncClient(timeout=10) as http:
        jwks = (await http.get(discovery["jwks_uri"])).json()
    # The token's kid is one the provider really publishes, as a key taskapp can use.
    kid = jwt.get_unverified_header(token)["kid"]
    published = {key["kid"]: key for key in jwks["keys"]}
    assert published[kid]["kty"] == "RSA"
    assert published[kid].get("use", "sig") == "sig"

    jwks_path = httpx.URL(discovery["jwks_uri"]).path
    # The provider reports requests on stdout, read by a thread: wait until our own JWKS
    # fetch above is recorded, so it is not mistaken for the app's.
    deadline = time.monotonic() + 5
    while real_provider.served()[-1:] != [("GET", jwks_path, 200)]:
        assert time.monotonic() < deadline, real_provider.served()
        await asyncio.sleep(0.01)
    mark = len(real_provider.requests)
    async with taskapp_for(make_settings, real_provider) as (app, client):
        response = await client.get("/tasks", headers=bearer(token))
        assert response.status_code == 200, response.text
        # Only the app talked to the provider in between: discovery first, then the JWKS.
        deadline = time.monotonic() + 5
        while len(real_provider.served(mark)) < 2:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        served = real_provider.served(mark)
        assert served == [
            ("GET", "/.well-known/openid-configuration", 200),
            ("GET", jwks_path, 200),
        ], served
        # A second token is verified from the cache: no further fetches.
        response = await client.get("/tasks", headers=bearer(token))
        assert response.status_code == 200, response.text
        await asyncio.sleep(0.2)  # time for any request to show up on the provider's stdout
        assert real_provider.served(mark)[2:] == []
        assert app_state(app).tokens.issuer == real_provider.issuer


async def test_user_role_token_lists_and_creates_tasks(
    app_client: httpx.AsyncClient, real_provider: RealProvider
) -> None:
    token = await real_provider.token(USER_CLIENT)
    subject = jwt.decode(token, options={"verify_signature": False})["sub"]

    listed = await app_client.get("/tasks", headers=bearer(token))
    assert listed.status_code == 200, listed.text
    assert listed.json()["items"] == []

    created = await app_client.post(
        "/tasks", json={"title": "from a real provider"}, headers=bearer(token)
    )
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["owner"] == subject == USER_CLIENT[0]
    assert task["title"] == "from a real provider"

    listed = await app_client.get("/tasks", headers=bearer(token))
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["items"]] == [task["id"]]


async def test_token_without_taskapp_role_is_forbidden(
    app_client: httpx.AsyncClient, real_provider: RealProvider
) -> None:
    token = await real_provider.token(NO_ROLE_CLIENT)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == AUDIENCE
    assert "user" not in claims["realm_access"]["roles"]

    for response in (
        await app_client.get("/tasks", headers=bearer(token)),
        await app_client.post("/tasks", json={"title": "nope"}, headers=bearer(token)),
    ):
        assert response.status_code == 403, response.text


async def test_token_for_another_audience_is_rejected(
    app_client: httpx.AsyncClient, real_provider: RealProvider
) -> None:
    token = await real_provider.token(USER_CLIENT, OTHER_RESOURCE)
    claims = jwt.decode(token, options={"verify_signature": False})
    # Same provider, same key, a valid user-role token: only the audience is wrong.
    assert claims["aud"] == "other-api"
    assert claims["iss"] == real_provider.issuer
    assert "user" in claims["realm_access"]["roles"]

    response = await app_client.get("/tasks", headers=bearer(token))
    assert_invalid_token(response, "Token audience not accepted")


@pytest.mark.parametrize(
    "resource", [OPAQUE_RESOURCE, None], ids=["opaque-resource", "no-resource"]
)
async def test_opaque_access_token_is_rejected(
    app_client: httpx.AsyncClient, real_provider: RealProvider, resource: str | None
) -> None:
    token = await real_provider.token(USER_CLIENT, resource)
    assert token.count(".") == 0, token  # a reference token, not a JWT

    response = await app_client.get("/tasks", headers=bearer(token))
    assert_invalid_token(response, "Malformed token")


async def test_provider_refuses_unknown_resource_and_bad_secret(
    real_provider: RealProvider,
) -> None:
    """The provider is really enforcing its configuration, not handing out anything."""
    unknown = await real_provider.token_response(USER_CLIENT, "https://unknown.example/")
    assert unknown.status_code == 400, unknown.text
    assert unknown.json()["error"] == "invalid_target"

    bad_secret = await real_provider.token_response((USER_CLIENT[0], "wrong"))
    assert bad_secret.status_code == 401, bad_secret.text
    assert bad_secret.json()["error"] == "invalid_client"
