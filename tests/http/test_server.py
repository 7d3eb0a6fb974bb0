"""TCP_NODELAY on the server side of real uvicorn connections, under the plain asyncio loop.

Each case starts a uvicorn server in a thread (its own asyncio loop, `loop="asyncio"`, so
uvloop cannot hide the problem) and reads the option from the accepted socket itself. The
plain `HttpToolsProtocol` is the control: on the same listeners it leaves the option off,
which is what makes the assertion on ours able to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from taskapp.http.server import HTTP_PROTOCOL, NoDelayHttpToolsProtocol
from testing.processes import TASKAPP, clean_env, running_server, start, stop
from testing.services import free_port


async def hello(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def recording(base: type[HttpToolsProtocol]) -> tuple[type[HttpToolsProtocol], list[int]]:
    """A subclass of `base` that records TCP_NODELAY of each accepted socket."""
    seen: list[int] = []

    class Recording(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    return Recording, seen


@contextlib.contextmanager
def running(config: uvicorn.Config, sockets: list[socket.socket] | None = None) -> Iterator[None]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            assert time.monotonic() < deadline, "the server did not start in time"
            time.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def tcp_server(kind: str, http: type[HttpToolsProtocol]) -> Iterator[tuple[str, int]]:
    """A server on a TCP listener made the way `kind` of deployment makes it."""
    options: dict[str, Any] = {
        "loop": "asyncio",
        "http": http,
        "lifespan": "off",
        "log_config": None,  # leave the test process's logging alone
        "access_log": False,
    }
    if kind == "workers":
        # What `uvicorn.run(workers=N)` (`taskapp serve`) does: bind, hand the socket over.
        config = uvicorn.Config(hello, host="127.0.0.1", port=0, **options)
        sock = config.bind_socket()
        try:
            with running(config, sockets=[sock]):
                yield sock.getsockname()
        finally:
            sock.close()
    else:  # "fd": an inherited listener (systemd socket activation, `uvicorn --fd`)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            with running(uvicorn.Config(hello, fd=listener.fileno(), **options)):
                yield listener.getsockname()
        finally:
            listener.close()


def get_twice(host: str, port: int) -> None:
    """Two requests on one keep-alive connection; both must succeed."""
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for _ in range(2):
            connection.request("GET", "/")
            response = connection.getresponse()
            assert response.status == 200
            assert response.read() == b"ok"
    finally:
        connection.close()


@pytest.mark.parametrize("kind", ["workers", "fd"])
def test_accepted_connections_have_tcp_nodelay(kind: str) -> None:
    protocol, seen = recording(NoDelayHttpToolsProtocol)
    with tcp_server(kind, protocol) as (host, port):
        get_twice(host, port)
    assert len(seen) == 1, "one connection, kept alive"
    assert seen[0] != 0, "TCP_NODELAY is off on the accepted socket"


@pytest.mark.parametrize("kind", ["workers", "fd"])
def test_control_plain_uvicorn_protocol_leaves_tcp_nodelay_off(kind: str) -> None:
    protocol, seen = recording(HttpToolsProtocol)
    with tcp_server(kind, protocol) as (host, port):
        get_twice(host, port)
    # Should this fail after a uvicorn upgrade, asyncio now gets the option set on these
    # listeners (uvicorn#3149 fixed) and taskapp.serving may no longer be needed.
    assert seen == [0]


def test_unix_socket_connections_still_work(tmp_path: Path) -> None:
    path = tmp_path / "taskapp.sock"
    config = uvicorn.Config(
        hello,
        uds=str(path),
        loop="asyncio",
        http=NoDelayHttpToolsProtocol,
        lifespan="off",
        log_config=None,
    )
    with running(config), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(path))
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b"\r\n\r\nok")


def test_http_protocol_string_names_the_class() -> None:
    config = uvicorn.Config(hello, http=HTTP_PROTOCOL, log_config=None)
    config.load()
    assert config.http_protocol_class is NoDelayHttpToolsProtocol


def exchange(host: str, port: int, *requests: bytes) -> bytes:
    """Send `requests` on one connection, each after the previous answer; all that came
    back (up to a reset or a broken pipe: a server that closes while a request is still
    arriving resets the connection, and a send still under way then fails)."""
    received = b""
    with socket.create_connection((host, port), timeout=5) as client:
        try:
            for request in requests:
                client.sendall(request)
                chunk = client.recv(65536)
                received += chunk
                if not chunk:
                    break
            client.settimeout(1)  # a kept-alive connection stays open: wait a moment only
            while chunk := client.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
    return received


def _head(header_bytes: int, *, extra: bytes = b"") -> bytes:
    return (
        b"GET / HTTP/1.1\r\nHost: test\r\nX-Padding: "
        + b"a" * header_bytes
        + b"\r\n"
        + extra
        + b"\r\n"
    )


@pytest.mark.parametrize("size", [70_000, 300_000])
def test_an_oversized_request_head_is_refused_with_431(size: int) -> None:
    with tcp_server("workers", NoDelayHttpToolsProtocol) as (host, port):
        received = exchange(host, port, _head(size))
        assert received.startswith(b"HTTP/1.1 431 "), received[:80]
        assert b"connection: close" in received
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head
        assert json.loads(body) == {
            "detail": "Request header fields too large",
            "code": "headers_too_large",
        }
        get_twice(host, port)  # the server goes on serving


async def test_every_operation_documents_the_431(client: httpx.AsyncClient) -> None:
    # The server answers it before any route, for every operation; the OpenAPI document
    # did not say so (found by `make fuzz`, which sends an 80 KB header).
    schema = (await client.get("/openapi.json")).json()
    limit = f"{NoDelayHttpToolsProtocol.MAX_HEAD_BYTES // 1024} KiB"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            documented = operation["responses"]["431"]
            assert limit in documented["description"], (method, path)
            example = documented["content"]["application/json"]["examples"]["headers_too_large"]
            assert example["value"]["code"] == "headers_too_large", (method, path)


def test_a_head_that_never_ends_is_cut_off() -> None:
    """10 MB of one header: refused long before the end (the client may see a reset)."""
    with tcp_server("workers", NoDelayHttpToolsProtocol) as (host, port):
        received = exchange(host, port, _head(10_000_000))
        assert received == b"" or received.startswith(b"HTTP/1.1 431 "), received[:80]
        get_twice(host, port)


def test_heads_under_the_limit_and_large_bodies_pass() -> None:
    body = b"x" * 200_000  # sent with its head in one write: the body is not the head
    post = (
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    with tcp_server("workers", NoDelayHttpToolsProtocol) as (host, port):
        assert exchange(host, port, _head(60_000)).startswith(b"HTTP/1.1 200 ")
        assert exchange(host, port, post).startswith(b"HTTP/1.1 200 ")
        # Each request on a kept-alive connection has a limit of its own.
        connection = http.client.HTTPConnection(host, port, timeout=5)
        try:
            statuses = []
            for size in (40_000, 40_000, 70_000):
                connection.putrequest("GET", "/")
                connection.putheader("X-Padding", "a" * size)
                connection.endheaders()
                response = connection.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            connection.close()
    assert statuses == [200, 200, 431]


def test_control_plain_uvicorn_protocol_takes_any_head() -> None:
    with tcp_server("workers", HttpToolsProtocol) as (host, port):
        # Should this fail after a uvicorn or httptools upgrade, they limit heads themselves.
        assert exchange(host, port, _head(1_000_000)).startswith(b"HTTP/1.1 200 ")


def _socket_owners(state: str, port: int) -> list[int]:
    """The pid holding each TCP socket on local `port` in `state` (listening, established)."""
    listing = subprocess.run(
        ["ss", "-Htnp", "state", state, f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(pid) for pid in re.findall(r"pid=(\d+)", listing)]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.slow
def test_serve_spreads_a_burst_of_keepalive_connections_over_the_workers(
    tmp_path: Path, serve_env: dict[str, str]
) -> None:
    port = free_port()
    with (
        running_server(["serve", "--workers", "2"], serve_env, port, tmp_path),
        contextlib.ExitStack() as stack,
    ):
        # Healthy means one worker is up; wait for the other's listener too.
        deadline = time.monotonic() + 30
        while len(_socket_owners("listening", port)) < 2:
            assert time.monotonic() < deadline, _socket_owners("listening", port)
            time.sleep(0.1)
        # One listening socket per worker, none shared.
        assert len(set(_socket_owners("listening", port))) == 2
        # Opened together and kept open, as a proxy's or a load generator's pool is.
        connections = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in range(16)
        ]
        for sock in connections:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in connections:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        owners = _socket_owners("established", port)
        assert len(owners) == 16, owners
        # With one shared listener the first worker awake takes them all; with one listener
        # per worker the kernel spreads them (all 16 on one of 2 has odds of 2 in 65,536).
        assert len(set(owners)) == 2, owners


@pytest.mark.slow
def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [TASKAPP, "serve", "--workers", "2", "--port", str(port)],
            env=clean_env(
                TASKAPP_DATA_DIR=str(tmp_path),
                TASKAPP_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:1/x",
                TASKAPP_REDIS_URL="redis://127.0.0.1:1",
                TASKAPP_OIDC_ISSUER="http://127.0.0.1:1/realms/taskapp",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"cannot listen on 0.0.0.0:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.slow
def test_serve_on_port_zero_gives_every_worker_the_same_port(
    tmp_path: Path, serve_env: dict[str, str]
) -> None:
    process = start(["serve", "--workers", "2", "--port", "0"], serve_env, tmp_path)
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None or len(_socket_owners("listening", port)) < 2:
            log = (tmp_path / "server.log").read_text()
            assert process.poll() is None, log
            assert time.monotonic() < deadline, log
            found = re.search(
                r"running on http://[\d.]+:(\d+)", (tmp_path / "server.log").read_text()
            )
            port = int(found.group(1)) if found else None
            time.sleep(0.1)
        assert port != 0
        assert len(set(_socket_owners("listening", port))) == 2
    finally:
        stop(process)
