"""deploy/check_env.py: what Compose users run on deploy/.env before `up`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testing.keycloak import check_env_module, keycloak_server, realm_document
from tests.deploy.stack import DEPLOY, filled_env

SCRIPT = DEPLOY / "check_env.py"


def run_check(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / ".env"
    path.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=False
    )


def test_a_filled_env_passes(tmp_path: Path) -> None:
    result = run_check(tmp_path, filled_env())
    assert (result.returncode, result.stderr) == (0, "")


def test_a_short_demo_password_is_named_with_the_realms_policy(tmp_path: Path) -> None:
    result = run_check(tmp_path, {**filled_env(), "DEMO_ALICE_PASSWORD": "short-pw"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"{tmp_path / '.env'}: DEMO_ALICE_PASSWORD (the password of 'alice') has 8 characters; "
        "the realm's password policy (length(12) and notUsername) needs at least 12"
    ]


def test_a_password_equal_to_the_username_is_refused(tmp_path: Path) -> None:
    result = run_check(tmp_path, {**filled_env(), "DEMO_ADMIN_PASSWORD": "ADMIN"})
    assert result.returncode == 1
    assert "has 5 characters" in result.stderr
    module = check_env_module()
    realm = {**realm_document(), "passwordPolicy": "notUsername"}
    problems = module.password_problems(
        realm, {"DEMO_ALICE_PASSWORD": "Alice", "DEMO_ADMIN_PASSWORD": "x" * 12}
    )
    assert problems == [
        "DEMO_ALICE_PASSWORD (the password of 'alice') is the username, which the realm's "
        "password policy (notUsername) refuses"
    ]


@pytest.mark.parametrize(
    "line",
    [
        'DEMO_ALICE_PASSWORD="short-pw"',
        "DEMO_ALICE_PASSWORD='short-pw'",
        "DEMO_ALICE_PASSWORD=short-pw # alice's",
        "export DEMO_ALICE_PASSWORD=short-pw",
    ],
)
def test_the_file_is_read_as_compose_reads_it(tmp_path: Path, line: str) -> None:
    """Quotes, a trailing comment and `export` are not part of the password."""
    env = {k: v for k, v in filled_env().items() if k != "DEMO_ALICE_PASSWORD"}
    path = tmp_path / ".env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()) + line + "\n")
    assert check_env_module().read_env(path)["DEMO_ALICE_PASSWORD"] == "short-pw"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "has 8 characters" in result.stderr


def test_empty_and_missing_secrets_are_named(tmp_path: Path) -> None:
    env = filled_env()
    env["REDIS_PASSWORD"] = ""
    del env["TASKAPP_METRICS_TOKEN"]
    result = run_check(tmp_path, env)
    assert result.returncode == 1
    assert "REDIS_PASSWORD is not set" in result.stderr
    assert "TASKAPP_METRICS_TOKEN is not set" in result.stderr


def test_a_missing_env_file_is_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "no such file" in result.stderr


def test_the_keycloak_harness_refuses_a_short_password_before_starting(tmp_path: Path) -> None:
    with (
        pytest.raises(ValueError, match=r"DEMO_ALICE_PASSWORD .* needs at least 12"),
        keycloak_server(tmp_path, passwords={"alice": "too-short", "admin": "x" * 16}),
    ):
        pass
    assert not (tmp_path / "keycloak.log").exists()
