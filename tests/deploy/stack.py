"""The deploy/ files as the tests read them: the compose file (interpolated the way Compose
does it), its env file example, the Keycloak realm."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
REALM_FILE = DEPLOY / "keycloak" / "realm.json"

# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


class MissingVariableError(ValueError):
    pass


def compose_variables(text: str) -> set[str]:
    """The names of the variables a compose file interpolates."""
    return {m.group(2) or m.group(5) for m in _VARIABLE.finditer(text) if not m.group(1)}


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(5)
        operator, argument = match.group(3), match.group(4)
        current = env.get(name)
        unset = current is None or (current == "" and operator is not None and ":" in operator)
        if operator is not None and operator.endswith("?") and unset:
            raise MissingVariableError(f"{name}: {argument}")
        if operator is not None and operator.endswith("-") and unset:
            return argument
        return current or ""

    return _VARIABLE.sub(replace, value)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def compose(env: Mapping[str, str]) -> dict[str, Any]:
    """The compose file with `env` interpolated (after parsing, as Compose does)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    return _interpolate_tree(document, env)  # type: ignore[no-any-return]


def env_example() -> dict[str, str]:
    """The variables of deploy/.env.example (commented-out lines excluded)."""
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"not NAME=value: {line!r}"
            values[name] = value
    return values


def filled_env() -> dict[str, str]:
    """The example with every empty value (the secrets) given its own URL-safe value."""
    return {
        name: value or f"{name.lower().replace('_', '-')}-0123456789abcdef"
        for name, value in env_example().items()
    }


def realm() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REALM_FILE.read_text())
    return data


def published_ports(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each "address:host:container[/tcp]"."""
    ports = []
    for entry in service.get("ports", []):
        address, host, container = str(entry).split(":")
        ports.append((address, int(host), int(container.removesuffix("/tcp"))))
    return ports


def healthcheck_disabled(service: Mapping[str, Any]) -> bool:
    """Compose v2 keeps `disable: true`; docker-compose 1.29 writes Docker's `test: [NONE]`."""
    check = service.get("healthcheck", {})
    return check.get("disable") is True or check.get("test") == ["NONE"]
