"""The real Keycloak, from its distribution on Maven Central, for tests.

`keycloak_server()` gets `org.keycloak:keycloak-quarkus-dist` with Maven (kept in `~/.m2`),
unpacks it once under a cache directory, and runs `kc.sh start-dev --import-realm` on free
ports with `deploy/keycloak/realm.json`, the file Compose mounts, unchanged: Keycloak fills
its `${...}` values from the environment, as in Compose. The dev database is in memory, so
each start imports the realm afresh. Needs `java` (17 or later) and `mvn`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from testing.services import free_port

ROOT = Path(__file__).resolve().parents[1]
REALM_FILE = ROOT / "deploy" / "keycloak" / "realm.json"
VERSION = "26.7.3"
ARTIFACT = f"org.keycloak:keycloak-quarkus-dist:{VERSION}:zip"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taskapp" / "keycloak"
# A first start builds Keycloak's optimized image (~20 s here) before it imports the realm.
READY_TIMEOUT = 240.0
DOWNLOAD_TIMEOUT = 900.0
REALM = "taskapp"


class KeycloakUnavailable(RuntimeError):
    """Keycloak cannot be had here (Java or Maven missing)."""


def missing_tools() -> list[str]:
    """The tools Keycloak's distribution needs that are not on PATH."""
    return [tool for tool in ("java", "mvn") if shutil.which(tool) is None]


def check_env_module() -> ModuleType:
    """deploy/check_env.py, the check Compose users run on deploy/.env."""
    spec = importlib.util.spec_from_file_location("check_env", ROOT / "deploy" / "check_env.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def realm_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(REALM_FILE.read_text())
    return document


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file) for the block, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def distribution(version: str = VERSION) -> Path:
    """Keycloak's home directory, downloaded and unpacked on first use."""
    home = CACHE / f"keycloak-{version}"
    with locked(CACHE / ".lock"):
        if (home / "bin" / "kc.sh").is_file():
            return home
        missing = missing_tools()
        if missing:
            raise KeycloakUnavailable(f"Keycloak needs {' and '.join(missing)} on PATH")
        with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
            command = ["mvn", "-B", "-q", "dependency:copy", f"-Dartifact={ARTIFACT}",
                       f"-DoutputDirectory={scratch}"]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False
            )
            archive = Path(scratch) / f"keycloak-quarkus-dist-{version}.zip"
            if done.returncode != 0 or not archive.is_file():
                raise RuntimeError(
                    f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                )
            unpacked = Path(scratch) / "unpacked"
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.infolist():
                    target = Path(zipped.extract(member, unpacked))
                    mode = member.external_attr >> 16  # the Unix mode, kept by zip
                    if mode and not member.is_dir():
                        target.chmod(mode & 0o777)
            (unpacked / f"keycloak-{version}").rename(home)
    return home


@dataclass
class Keycloak:
    """A running Keycloak: its public and internal addresses, its administrator and the
    realm's demo users' passwords."""

    port: int
    management_port: int
    admin: tuple[str, str]
    passwords: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes]
    _admin_token: tuple[str, float] | None = field(default=None, repr=False)

    @property
    def public_url(self) -> str:
        """The address tokens name (`--hostname`), as browsers and curl use it."""
        return f"http://localhost:{self.port}"

    @property
    def internal_url(self) -> str:
        """Another address of the same server (a container network's, in Compose)."""
        return f"http://127.0.0.1:{self.port}"

    def issuer(self, realm: str = REALM) -> str:
        return f"{self.public_url}/realms/{realm}"

    def discovery_url(self, realm: str = REALM) -> str:
        return f"{self.internal_url}/realms/{realm}/.well-known/openid-configuration"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str) -> Any:
        """The JSON document at `path` of the internal address (discovery, the JWKS)."""
        response = httpx.get(f"{self.internal_url}{path}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def token_response(
        self,
        username: str,
        password: str | None = None,
        *,
        client_id: str = "taskapp-cli",
        realm: str = REALM,
        scope: str | None = None,
    ) -> dict[str, Any]:
        """The token endpoint's answer to a password grant."""
        form = {
            "grant_type": "password",
            "client_id": client_id,
            "username": username,
            "password": password if password is not None else self.passwords[username],
        }
        if scope is not None:
            form["scope"] = scope
        url = f"{self.internal_url}/realms/{realm}/protocol/openid-connect/token"
        response = httpx.post(url, data=form, timeout=30)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def token(self, username: str, **options: Any) -> str:
        """An access token of `username` (password grant, client `taskapp-cli`)."""
        token: str = self.token_response(username, **options)["access_token"]
        return token

    def admin_request(self, method: str, path: str, **options: Any) -> httpx.Response:
        """A call to the admin REST API (`/admin/realms/...`) as the bootstrap admin."""
        if self._admin_token is None or time.monotonic() > self._admin_token[1]:
            body = self.token_response(
                self.admin[0], self.admin[1], client_id="admin-cli", realm="master"
            )
            expires = time.monotonic() + body["expires_in"] - 10
            self._admin_token = (body["access_token"], expires)
        headers = {"Authorization": f"Bearer {self._admin_token[0]}"}
        url = f"{self.internal_url}/admin/realms{path}"
        return httpx.request(method, url, headers=headers, timeout=30, **options)


def _wait_ready(process: subprocess.Popen[bytes], management_port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    url = f"http://127.0.0.1:{management_port}/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Keycloak exited ({process.returncode}) before it was ready; its log:\n"
                + log.read_text(errors="replace")[-6000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(
        f"Keycloak not ready within {READY_TIMEOUT:.0f} s; its log:\n"
        + log.read_text(errors="replace")[-6000:]
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Keycloak's whole process group: kc.sh runs Java as a child of its own."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def keycloak_server(work: Path, passwords: dict[str, str] | None = None) -> Iterator[Keycloak]:
    """Keycloak with the realm imported, ready, for the duration of the block; its log in
    `work`. The demo users' `passwords` (random by default) are checked against the realm's
    policy first, as `deploy/check_env.py` checks Compose's: Keycloak would refuse the
    import, and not start."""
    if passwords is None:
        passwords = {"alice": secrets.token_urlsafe(18), "admin": secrets.token_urlsafe(18)}
    values = {"DEMO_ALICE_PASSWORD": passwords["alice"], "DEMO_ADMIN_PASSWORD": passwords["admin"]}
    problems = check_env_module().password_problems(realm_document(), values)
    if problems:
        raise ValueError("the realm cannot be imported: " + "; ".join(problems))
    home = distribution()
    admin = ("kc-admin", secrets.token_urlsafe(18))
    port, management_port = free_port(), free_port()
    # Nothing of this machine's own Keycloak, Quarkus or JVM settings.
    own = ("KC_", "KEYCLOAK_", "QUARKUS_", "JAVA_OPTS", "JAVA_ADD_OPENS")
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(own)},
        **values,
        "KC_BOOTSTRAP_ADMIN_USERNAME": admin[0],
        "KC_BOOTSTRAP_ADMIN_PASSWORD": admin[1],
    }
    command = [
        str(home / "bin" / "kc.sh"), "start-dev", "--import-realm", "--db=dev-mem",
        "--http-host=127.0.0.1", f"--http-port={port}",
        f"--http-management-port={management_port}",
        "--health-enabled=true", f"--hostname=http://localhost:{port}",
        "--hostname-backchannel-dynamic=true",
    ]  # fmt: skip
    log = work / "keycloak.log"
    imports = home / "data" / "import"
    # One start at a time reads the import directory, with this realm in it only.
    with locked(CACHE / ".start.lock"):
        shutil.rmtree(imports, ignore_errors=True)
        imports.mkdir(parents=True)
        shutil.copyfile(REALM_FILE, imports / "taskapp-realm.json")
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_ready(process, management_port, log)
        except BaseException:
            _stop(process)
            raise
        finally:
            shutil.rmtree(imports, ignore_errors=True)
    try:
        yield Keycloak(port, management_port, admin, passwords, log, process)
    finally:
        _stop(process)
