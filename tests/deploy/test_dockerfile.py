"""The Dockerfile and .dockerignore, read statically.

No Docker engine runs where the tests run, so the image is not built here, and hadolint is
not installed; these tests parse the Dockerfile's instructions and check what the image
promises: a multi-stage build, a slim runtime without build tools, an unprivileged user, a
healthcheck on /healthz, and a layout in which `taskapp migrate` finds its migrations.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from taskapp.database.migrations import alembic_config
from tests.deploy.stack import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
APP_DIR = "/app"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    result = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        result.append(Instruction(keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return result


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the build stages in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base, name, []))
        elif not stages and instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
        else:
            assert stages, f"{instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return args, stages


def exec_form(arguments: str) -> list[str]:
    words = json.loads(arguments)
    assert isinstance(words, list), f"not the exec (JSON) form: {arguments}"
    return [str(word) for word in words]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse()[1]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_multi_stage_build_on_python_311_slim(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base


def test_the_runtime_stage_runs_as_an_unprivileged_user(runtime: Stage) -> None:
    (user,) = runtime.all("USER")
    name, _, group = user.partition(":")
    assert name not in {"root", "0"}
    assert group not in {"root", "0"}
    assert any("useradd" in run and f"--uid {name}" in run for run in runtime.all("RUN"))
    # USER comes after every RUN: nothing of the image is built as that user.
    keywords = [i.keyword for i in runtime.instructions]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_the_runtime_stage_has_no_build_tools(runtime: Stage) -> None:
    runs = " ".join(runtime.all("RUN"))
    for tool in ("apt-get", "apk", "gcc", "build-essential", "pip install", "pip3 install"):
        assert tool not in runs, f"runtime stage runs {tool!r}"
    assert re.search(r"pip uninstall .*\bpip setuptools wheel\b", runs)
    copies = runtime.all("COPY")
    assert all(copy.startswith("--from=builder ") for copy in copies), copies
    # The virtualenv is made without pip (the builder's pip installs into it).
    (builder_venv,) = [r for r in parse()[1][0].all("RUN") if "-m venv" in r]
    assert "--without-pip" in builder_venv


def test_the_builder_installs_pinned_wheels_and_no_dev_tools(stages: list[Stage]) -> None:
    installs = [run for run in stages[0].all("RUN") if " install " in run]
    dependencies = [run for run in installs if "--requirement" in run]
    assert len(dependencies) == 1
    assert "--constraint requirements.lock" in dependencies[0]
    assert "--only-binary=:all:" in dependencies[0]
    # The runtime requirements are the project's dependencies, not the whole lock.
    assert "['project']['dependencies']" in dependencies[0]
    assert "--requirement requirements.lock" not in dependencies[0]
    (project,) = [run for run in installs if run not in dependencies]
    assert "--no-deps" in project


def test_healthcheck_asks_healthz_and_the_default_command_serves(runtime: Stage) -> None:
    (healthcheck,) = runtime.all("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    words = exec_form(command)
    assert words[:2] == ["python", "-c"]  # the slim image has no curl or wget
    assert "http://127.0.0.1:8000/healthz" in words[2]
    compile(words[2], "<healthcheck>", "exec")  # the check itself is valid Python

    assert runtime.all("EXPOSE") == ["8000"]
    assert exec_form(runtime.all("CMD")[0]) == [
        "taskapp",
        "serve",
        "--host",
        "0.0.0.0",  # noqa: S104 - inside the container, behind nginx
        "--port",
        "8000",
        "--workers",
        "2",
    ]
    env = " ".join(runtime.all("ENV"))
    assert "TASKAPP_ENV=production" in env
    assert "PATH=/opt/venv/bin:$PATH" in env


def test_the_image_keeps_the_layout_taskapp_migrate_expects(stages: list[Stage]) -> None:
    # taskapp.database.migrations looks for alembic.ini and migrations/ beside the package.
    config = alembic_config()
    assert config.config_file_name is not None
    repository_root = Path(config.config_file_name).parent
    assert (repository_root / "taskapp" / "database" / "migrations.py").exists()
    assert config.get_main_option("script_location") == str(repository_root / "migrations")

    builder = stages[0]
    assert builder.all("WORKDIR") == [APP_DIR]
    copied = {}
    for copy in builder.all("COPY"):
        *sources, destination = shlex.split(copy)
        for source in sources:
            target = destination if not destination.endswith("/") else destination + source
            copied[source] = str(Path(APP_DIR, target).resolve())
    for name in ("taskapp", "migrations", "alembic.ini"):
        assert copied[name] == f"{APP_DIR}/{name}", name
    # Installed in place (editable), so the package runs from /app/taskapp.
    assert any("--editable ." in run for run in builder.all("RUN"))
    assert f"--from=builder {APP_DIR} {APP_DIR}" in stages[-1].all("COPY")
    assert stages[-1].all("WORKDIR") == [APP_DIR]


def test_the_build_context_holds_only_what_the_dockerfile_copies(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must start by excluding everything"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.startswith("--from=")
        for source in shlex.split(copy)[:-1]
    }
    assert allowed == copied
    for path in allowed:
        assert (ROOT / path).exists(), path
