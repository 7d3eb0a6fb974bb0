"""Check deploy/.env before `docker compose up`: every secret of .env.example set, and the
demo users' passwords acceptable to the realm Keycloak imports (deploy/keycloak/realm.json).

    python3 deploy/check_env.py [deploy/.env]

Exits 1 with one line per problem. Keycloak refuses a realm whose users' passwords break its
password policy, and then does not start at all; this says why beforehand, in words.
Standard library only: it runs wherever Compose does.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parent
REALM = DEPLOY / "keycloak" / "realm.json"
EXAMPLE = DEPLOY / ".env.example"
PLACEHOLDER = re.compile(r"^\$\{([A-Z0-9_]+)\}$")


def read_env(path: Path) -> dict[str, str]:
    """The NAME=value lines of an env file as Compose reads them: comments and blank lines
    skipped, an `export ` prefix dropped, a quoted value taken between its quotes, and an
    unquoted one up to a ` #` comment."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        quoted = re.match(r"""^(["'])(.*)\1(\s+#.*)?$""", value)
        if quoted:
            value = quoted.group(2)
        else:
            value = re.sub(r"\s+#.*$", "", value)
        values[name.strip()] = value
    return values


def minimum_length(policy: str) -> int:
    """The least length a Keycloak password policy asks for (`length(12) and ...`); 0 if
    none."""
    found = re.search(r"\blength\((\d+)\)", policy)
    return int(found.group(1)) if found else 0


def password_problems(realm: Mapping[str, Any], values: Mapping[str, str]) -> list[str]:
    """What the realm's password policy would refuse among the passwords its users take
    from `values` (credentials written as `${NAME}`)."""
    policy = str(realm.get("passwordPolicy", ""))
    least = minimum_length(policy)
    problems = []
    for user in realm.get("users", []):
        for credential in user.get("credentials", []):
            found = PLACEHOLDER.match(str(credential.get("value", "")))
            if credential.get("type") != "password" or not found:
                continue
            name, username = found.group(1), user.get("username", "")
            password = values.get(name)
            if not password:
                problems.append(f"{name} (the password of {username!r}) is not set")
            elif len(password) < least:
                problems.append(
                    f"{name} (the password of {username!r}) has {len(password)} characters; "
                    f"the realm's password policy ({policy}) needs at least {least}"
                )
            elif "notUsername" in policy and password.lower() == str(username).lower():
                problems.append(
                    f"{name} (the password of {username!r}) is the username, which the "
                    f"realm's password policy ({policy}) refuses"
                )
    return problems


def env_problems(env: Mapping[str, str], example: Mapping[str, str]) -> list[str]:
    """Secrets of the example left empty or missing."""
    return [f"{name} is not set" for name in example if not env.get(name)]


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEPLOY / ".env"
    if not path.is_file():
        print(f"{path}: no such file (copy deploy/.env.example and fill it in)", file=sys.stderr)
        return 1
    env = read_env(path)
    problems = env_problems(env, read_env(EXAMPLE))
    realm = json.loads(REALM.read_text())
    problems += [p for p in password_problems(realm, env) if not p.endswith("is not set")]
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
