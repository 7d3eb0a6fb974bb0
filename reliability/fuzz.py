"""`make fuzz`: hostile input against `taskapp serve`, generated from its own /openapi.json.

Starts the service the way production runs it (`taskapp serve`, TASKAPP_ENV=production, two
workers, real PostgreSQL and Redis, a local OIDC provider minting RS256 tokens, the rate
limit raised out of the way), then:

- Schemathesis generates requests for every operation of the served schema, valid ones
  (positive) and invalid ones (negative), each sent once with a `user` token and once with
  an `admin` token;
- every operation with a request body also gets bodies no generator would make: bytes that
  are not UTF-8, text that is not JSON, JSON nested past the parser's recursion limit,
  numbers past Python's digit limit, and content types other than JSON.

Every response must pass Schemathesis's checks: no server error, a status the operation
documents, a body matching the documented schema, the documented content type, and no
400/422 for input the schema calls valid. Prints the cases per operation and token, the
statuses seen and every failure; exits 1 on any failure.
`tests/reliability/test_fuzz.py` runs the same code in-process against the ASGI app, with
fewer cases.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import HypothesisException
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Ok
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

ROOT = Path(__file__).resolve().parent.parent
Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Operation]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    response_schema_conformance,
    content_type_conformance,
    # Input the schema calls valid is not refused with 400/422: the schema tells the truth.
    positive_data_acceptance,
]
# Rules of the data that no schema can state (whether a user is a member of a project): a 422
# whose every problem is one of these refuses valid-looking input rightly.
SERVICE_RULES = frozenset({"not_a_member", "user_ambiguous"})
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Token lifetime for a run: long enough for any case count someone is likely to ask for.
TOKEN_LIFETIME = 6 * 3600

# `send(method, url, **httpx request options)`: an HTTP client's `request`, over TCP or ASGI.
Send = Callable[..., httpx.Response]

_DEEP = 100_000  # nesting levels: past json's recursion limit, well under the body size cap
HOSTILE_BODIES: list[tuple[str, str | None, bytes]] = [
    ("invalid UTF-8 in a JSON string", "application/json", b'{"title": "\xff\xfe"}'),
    ("invalid UTF-8 bytes", "application/json", b"\xc3\x28\xa0\xa1\xff"),
    ("truncated UTF-8 sequence", "application/json", b'{"title": "\xe2\x82"}'),
    ("UTF-8 byte order mark", "application/json", b'\xef\xbb\xbf{"title": "bom"}'),
    ("UTF-16 JSON", "application/json", '{"title": "utf16"}'.encode("utf-16")),
    (
        "latin-1 with a declared charset",
        "application/json; charset=latin-1",
        '{"title": "caf\u00e9"}'.encode("latin-1"),
    ),
    ("not JSON", "application/json", b"title=not json"),
    ("truncated JSON", "application/json", b'{"title": '),
    ("empty body", "application/json", b""),
    ("whitespace only", "application/json", b" \r\n\t "),
    ("JSON null", "application/json", b"null"),
    ("JSON array", "application/json", b'[{"title": "in a list"}]'),
    ("JSON string", "application/json", b'"title"'),
    ("JSON number", "application/json", b"42"),
    ("number past float range", "application/json", b'{"title": 1e999999}'),
    ("integer past the digit limit", "application/json", b'{"title": ' + b"9" * 5000 + b"}"),
    ("NaN and Infinity", "application/json", b'{"title": NaN, "description": Infinity}'),
    ("array nested past the recursion limit", "application/json", b"[" * _DEEP + b"]" * _DEEP),
    (
        "object nested past the recursion limit",
        "application/json",
        b'{"title": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}",
    ),
    ("duplicate keys", "application/json", b'{"title": "first", "title": "second"}'),
    ("trailing garbage", "application/json", b'{"title": "x"} trailing'),
    ("NUL escaped in a string", "application/json", b'{"title": "a\\u0000b"}'),
    ("lone surrogate escaped in a string", "application/json", b'{"title": "\\ud800"}'),
    ("raw control character in a string", "application/json", b'{"title": "a\x01b"}'),
    ("text/plain", "text/plain", b'{"title": "plain"}'),
    ("form-encoded", "application/x-www-form-urlencoded", b"title=form"),
    (
        "multipart",
        "multipart/form-data; boundary=xyz",
        b'--xyz\r\nContent-Disposition: form-data; name="title"\r\n\r\nmultipart\r\n--xyz--\r\n',
    ),
    ("XML", "application/xml", b"<task><title>xml</title></task>"),
    ("no content type", None, b'{"title": "untyped"}'),
    ("content type without subtype", "application", b'{"title": "x"}'),
    ("content type with a broken parameter", "application/json; charset", b'{"title": "x"}'),
    ("unknown charset", "application/json; charset=klingon", b'{"title": "x"}'),
    ("JSON suffix type", "application/merge-patch+json", b'{"title": "suffix"}'),
    ("octet stream", "application/octet-stream", b"\x00\x01\x02\x03"),
]

# Sent to every operation with each token (a value of None drops the token).
HOSTILE_HEADERS: list[tuple[str, dict[str, str | bytes | None]]] = [
    ("no token", {"Authorization": None}),
    ("token not UTF-8", {"Authorization": b"Bearer \xff\xfe\xfd"}),
    ("scheme without token", {"Authorization": "Bearer"}),
    ("Basic credentials", {"Authorization": "Basic Zm9vOmJhcg=="}),
    ("three dots of garbage", {"Authorization": "Bearer a.b.c"}),
    ("token of 8 KB", {"Authorization": "Bearer " + "A" * 8192}),
    ("request id not UTF-8", {"X-Request-ID": b"\xff\xfe"}),
    ("request id of 8 KB", {"X-Request-ID": "r" * 8192}),
    # past the 64 KiB head limit of `taskapp serve` (in-process, the app answers as usual)
    ("a header of 80 KB", {"X-Padding": "p" * 80_000}),
    ("Accept OpenMetrics", {"Accept": "application/openmetrics-text; version=1.0.0"}),
    ("Accept XML only", {"Accept": "application/xml"}),
    ("Accept-Encoding nonsense", {"Accept-Encoding": "gzip;q=bogus, br;q=-1"}),
    ("X-Forwarded-For garbage", {"X-Forwarded-For": b"not-an-ip, \xff, 999.1.1.1"}),
]
# Raw (already percent-encoded) query strings and path segments, past any generator's reach.
HOSTILE_QUERIES = [
    "page=%ff", "owner=%ff%fe", "owner=%00", "owner=%e2%82", "status=%c0%80", "page=1&page=x",
    "page=" + "9" * 5000, "page_size=1e2", "%ff=%ff", "owner=" + "o" * 5000, "&&&==&",
]  # fmt: skip
HOSTILE_SEGMENTS = ["%ff", "%00", "%c0%af", "..%2f..%2fetc", "x" * 5000, "%20", "-1"]


@dataclass
class Figures:
    """What a run sent and saw."""

    # (operation, token, source) -> cases sent; source: positive | negative | hostile
    cases: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    # generated cases no HTTP client can send (e.g. a header value that is not Latin-1)
    unsendable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.cases.values())


@dataclass
class Run:
    """Where a run's requests go, as whom, and what it saw."""

    send: Send
    base_url: str
    # token name -> its Authorization header
    tokens: Mapping[str, Mapping[str, str]]
    # values for path parameters that name something that exists (a task of the user)
    path_parameters: Mapping[str, Any]
    figures: Figures = field(default_factory=Figures)

    def known(self, operation: Operation) -> dict[str, Any]:
        """The known path parameters of `operation`."""
        return {k: v for k, v in self.path_parameters.items() if "{" + k + "}" in operation.path}


# A request no generator makes: what it is, its URL, header changes (None drops), its body.
Probe = tuple[str, str, Mapping[str, str | bytes | None], bytes | None]


def _request_options(case: AnyCase, base_url: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Schemathesis's serialization of a case, as httpx request options."""
    kwargs = case.as_transport_kwargs(base_url=base_url, headers=dict(headers))
    options: dict[str, Any] = {
        "method": kwargs["method"],
        "url": kwargs["url"],
        "headers": dict(kwargs.get("headers") or {}),
        "params": kwargs.get("params") or None,
    }
    if cookies := kwargs.get("cookies"):
        options["headers"]["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    if "json" in kwargs:
        options["json"] = kwargs["json"]
    elif isinstance(kwargs.get("data"), bytes | str):
        options["content"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        options["data"] = kwargs["data"]
    return options


def _exchange(
    run: Run, case: AnyCase, where: tuple[str, str], what: str, options: dict[str, Any]
) -> None:
    """Send one request, count it, and check its response against the schema."""
    label = case.operation.label
    try:
        response = run.send(**options)
    except httpx.TransportError as error:
        # The server dropped or refused the connection.
        run.figures.cases[(label, *where)] += 1
        run.figures.failures.append(f"{label} [{'/'.join(where)}] {error!r}\n    sent: {what}")
        return
    except (httpx.HTTPError, UnicodeError, ValueError, TypeError):
        run.figures.unsendable += 1
        return
    run.figures.cases[(label, *where)] += 1
    run.figures.statuses[(label, response.status_code)] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            if isinstance(failure, RejectedPositiveData) and _refused_by_a_rule(response):
                continue
            run.figures.failures.append(_describe(failure, response, label, where, what))


def _refused_by_a_rule(response: httpx.Response) -> bool:
    """A 422 for the data's own rules only (SERVICE_RULES), not for the input's shape."""
    if response.status_code != 422:
        return False
    try:
        problems = response.json()["detail"]
        return bool(problems) and all(problem["type"] in SERVICE_RULES for problem in problems)
    except (ValueError, KeyError, TypeError):
        return False


def _describe(
    failure: Failure, response: httpx.Response, label: str, where: tuple[str, str], what: str
) -> str:
    body = response.text[:200].replace("\n", " ")
    return (
        f"{label} [{'/'.join(where)}] {failure.title}: {response.status_code} {body!r}\n"
        f"    {failure.message.strip()[:400]}\n    sent: {what[:400]}"
    )


def generated(schema: OpenApiSchema, run: Run, cases: int, seed: int) -> None:
    """Schemathesis's positive and negative cases for every operation and token.

    Half the positive cases of an operation on one task use the known path parameters (an
    existing task), so generated input also reaches the found-and-changed path and its
    response is checked, not only the 404 of a random id. DELETE keeps random ids.
    """
    operations = _operations(schema)
    # An operation without parameters or body has one possible request: the cases go to the rest.
    variable = [operation for operation in operations if _has_input(operation)]
    per_group = max(1, cases // max(1, len(variable) * len(run.tokens) * len(MODES)))
    for operation in operations:
        known = run.known(operation) if operation.method.upper() != "DELETE" else {}
        for token in run.tokens:
            for mode in MODES if operation in variable else MODES[:1]:
                if known and mode is GenerationMode.POSITIVE:
                    _generate(run, operation, mode, token, per_group // 2, seed, known)
                    _generate(run, operation, mode, token, per_group - per_group // 2, seed)
                else:
                    _generate(run, operation, mode, token, per_group, seed)


def _generate(
    run: Run,
    operation: Operation,
    mode: GenerationMode,
    token: str,
    examples: int,
    seed: int,
    path_parameters: dict[str, Any] | None = None,
) -> None:
    where = (token, mode.value)
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @hypothesis.given(strategy)
    def send(case: AnyCase) -> None:
        options = _request_options(case, run.base_url, run.tokens[token])
        # The curl line leaves the token out: it was added to the request, not to the case.
        _exchange(run, case, where, case.as_curl_command(), options)

    try:
        send()
    except HypothesisException as error:
        # e.g. an operation without parameters or body has no negative case to make
        run.figures.notes.append(
            f"{operation.label} [{token}/{mode.value}]: no cases ({type(error).__name__})"
        )


def _operations(schema: OpenApiSchema) -> list[Operation]:
    operations = []
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise SystemExit(f"fuzz: the served schema has an invalid operation: {result.err()}")
        operations.append(result.ok())
    return operations


def _has_body(operation: Operation) -> bool:
    return bool(operation.definition.raw.get("requestBody"))


def _has_input(operation: Operation) -> bool:
    return _has_body(operation) or bool(operation.definition.raw.get("parameters"))


def hostile(schema: OpenApiSchema, run: Run, max_body_bytes: int) -> None:
    """To every operation with every token: HOSTILE_HEADERS, a body over the size limit, raw
    queries and path segments; to those that take a body, every body in HOSTILE_BODIES."""
    for operation in _operations(schema):
        case = operation.Case(path_parameters=run.known(operation))
        url = run.base_url + case.formatted_path
        probes: list[Probe] = [(name, url, changes, None) for name, changes in HOSTILE_HEADERS]
        probes.append(("a body over the size limit", url, {}, b"x" * (max_body_bytes + 1)))
        if _has_body(operation):
            probes += [
                (name, url, {"Content-Type": content_type}, body)
                for name, content_type, body in HOSTILE_BODIES
            ]
        parameters = operation.definition.raw.get("parameters") or []
        if any(parameter["in"] == "query" for parameter in parameters):
            probes += [(f"?{query}", f"{url}?{query}", {}, None) for query in HOSTILE_QUERIES]
        for parameter in parameters:
            if parameter["in"] == "path":
                template = "{" + parameter["name"] + "}"
                probes += [
                    (f"{template} = {segment[:20]}",
                     run.base_url + operation.path.replace(template, segment), {}, None)
                    for segment in HOSTILE_SEGMENTS
                ]  # fmt: skip
        for token, token_headers in run.tokens.items():
            for name, target, changes, body in probes:
                headers: dict[str, str | bytes] = dict(token_headers)
                for header, value in changes.items():
                    if value is None:
                        headers.pop(header, None)
                    else:
                        headers[header] = value
                method = operation.method.upper()
                what = f"{method} {target[len(run.base_url) :][:80]} with {name}"
                options = {"method": method, "url": target, "headers": headers, "content": body}
                _exchange(run, case, (token, "hostile"), what, options)


def load_schema(document: dict[str, Any]) -> OpenApiSchema:
    """The served OpenAPI document as a Schemathesis schema."""
    return schemathesis.openapi.from_dict(document)


def targets(send: Send, base_url: str, tokens: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """What the path parameters name: a task, a project of the `user` token's caller (with
    the task in it), and that caller (a member)."""
    user = tokens["user"]
    me = send("GET", f"{base_url}/users/me", headers=user)
    project = send("POST", f"{base_url}/projects", headers=user, json={"name": "fuzz target"})
    created = send(
        "POST",
        f"{base_url}/tasks",
        headers=user,
        json={"title": "fuzz target", "project_id": project.json()["id"]},
    )
    for response in (me, project, created):
        if response.status_code >= 300:
            raise SystemExit(f"fuzz: could not make its targets: {response.text}")
    return {
        "task_id": created.json()["id"],
        "project_id": project.json()["id"],
        "user": me.json()["id"],
    }


def run_all(
    document: dict[str, Any],
    send: Send,
    base_url: str,
    tokens: Mapping[str, Mapping[str, str]],
    *,
    cases: int,
    seed: int,
    path_parameters: Mapping[str, Any],
    max_body_bytes: int,
) -> Figures:
    """Generated cases, then hostile requests; the figures of both."""
    schema = load_schema(document)
    run = Run(send, base_url, tokens, path_parameters)
    generated(schema, run, cases, seed)
    hostile(schema, run, max_body_bytes)
    return run.figures


def summary(figures: Figures, tokens: list[str], seconds: float | None = None) -> str:
    """The figures as a table: cases per operation and token, statuses seen, failures."""
    operations = sorted({label for label, _, _ in figures.cases}, key=lambda s: s.split()[::-1])
    sources = ("positive", "negative", "hostile")
    header = f"{'operation':<26}" + "".join(f"{t + ' cases':>13}" for t in tokens)
    lines = [header + "  statuses (count)"]
    for label in operations:
        counts = ""
        for token in tokens:
            parts = [figures.cases[(label, token, source)] for source in sources]
            counts += f"{sum(parts):>13}"
        seen = sorted((status, n) for (op, status), n in figures.statuses.items() if op == label)
        lines.append(f"{label:<26}{counts}  " + " ".join(f"{s}×{n}" for s, n in seen))  # noqa: RUF001
    by_source: Counter[str] = Counter()
    for (_, _, source), n in figures.cases.items():
        by_source[source] += n
    statuses: Counter[int] = Counter()
    for (_, status), n in figures.statuses.items():
        statuses[status] += n
    timing = f" in {seconds:.0f} s" if seconds is not None else ""
    lines.append("")
    lines.append(
        f"{figures.total:,} cases{timing}: "
        + ", ".join(f"{by_source[source]:,} {source}" for source in sources)
        + f"; {figures.unsendable} generated cases no HTTP client can send were skipped"
    )
    lines.append("statuses: " + ", ".join(f"{s}×{n:,}" for s, n in sorted(statuses.items())))  # noqa: RUF001
    lines.extend(f"note: {note}" for note in figures.notes)
    lines.append(f"failures: {len(figures.failures)}")
    lines.extend(figures.failures[:50])
    if len(figures.failures) > 50:
        lines.append(f"... and {len(figures.failures) - 50} more")
    return "\n".join(lines)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability.fuzz", description=__doc__)
    parser.add_argument(
        "--cases",
        type=int,
        default=4000,
        help="generated cases in all, spread over operations, tokens, positive and negative "
        "(an operation with few possible inputs gets fewer); hostile bodies come on top",
    )
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (same seed, same run)")
    parser.add_argument("--workers", type=int, default=2, help="`taskapp serve --workers`")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _server(env: dict[str, str], workers: int, work: Path) -> Iterator[str]:
    from testing.processes import running_server
    from testing.services import free_port

    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--workers", str(workers)]
    with running_server(args, env, port, work):
        yield f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    from bench.run import _forget_keys, _services
    from taskapp.config import Settings
    from taskapp.database.migrations import upgrade_database
    from testing.oidc import serve_provider
    from testing.processes import clean_env

    args = _arguments(argv)
    work = Path(tempfile.mkdtemp(prefix="taskapp-fuzz-"))
    prefix = f"fuzz-{uuid.uuid4().hex[:12]}:"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        database_url, redis_url = stack.enter_context(_services(work))
        async_url = database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
        upgrade_database(async_url)
        provider = stack.enter_context(contextlib.contextmanager(serve_provider)())
        env = clean_env(
            TASKAPP_ENV="production",
            TASKAPP_DATA_DIR=str(work),
            TASKAPP_DATABASE_URL=async_url,
            TASKAPP_REDIS_URL=redis_url,
            TASKAPP_REDIS_KEY_PREFIX=prefix,
            TASKAPP_OIDC_ISSUER=provider.issuer,
            TASKAPP_NOTIFICATIONS_QUEUE=f"{prefix}notifications",
            # Far above what the run sends: every response is the operation's own answer.
            TASKAPP_RATE_LIMIT="1000000/second",
            TASKAPP_RATE_LIMIT_ANONYMOUS="1000000/second",
        )
        stack.callback(_forget_keys, redis_url, prefix)
        base_url = stack.enter_context(_server(env, args.workers, work))
        expires = int(time.time()) + TOKEN_LIFETIME
        tokens = {
            "user": provider.auth("fuzz-user", roles=("user",), exp=expires),
            "admin": provider.auth("fuzz-admin", roles=("admin",), exp=expires),
        }
        with httpx.Client(timeout=30) as client:
            document = client.get(f"{base_url}/openapi.json").raise_for_status().json()
            known = targets(client.request, base_url, tokens)
            print(
                f"taskapp serve (production, {args.workers} workers) on {base_url}; "
                f"{sum(len(ops) for ops in document['paths'].values())} operations on "
                f"{len(document['paths'])} paths from its /openapi.json; "
                f"Schemathesis {schemathesis.__version__}, seed {args.seed}",
                flush=True,
            )
            started = time.monotonic()
            figures = run_all(
                document,
                client.request,
                base_url,
                tokens,
                cases=args.cases,
                seed=args.seed,
                path_parameters=known,
                max_body_bytes=Settings.model_fields["max_body_bytes"].default,
            )
            elapsed = time.monotonic() - started
        log = (work / "server.log").read_text(errors="replace")
    print(summary(figures, list(tokens), elapsed))
    if "Traceback" in log:
        print("server log has a traceback:\n" + log[log.index("Traceback") :][:3000])
        return 1
    return 1 if figures.failures else 0


if __name__ == "__main__":
    sys.exit(main())
