"""deploy/nginx/taskapp.conf, run by a real nginx in front of a backend that echoes what it
receives.

Two lines differ from the file in the stack, and only where this machine differs from it:
the listening port, and the upstream `api:8000 resolve` (Docker's DNS name of the replicas;
`resolve` needs nginx 1.27.3+, Debian's is older) becomes the local backend.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from reliability.chaos_stack import nginx_main
from testing.services import free_port
from tests.deploy.stack import DEPLOY
from tests.fixtures.tools import nginx

CONFIG = DEPLOY / "nginx" / "taskapp.conf"
UPSTREAM = "server api:8000 resolve max_fails=1 fail_timeout=5s;"
LISTEN = "listen 80 default_server;"


@dataclass
class Seen:
    """What the backend received: one entry per request."""

    headers: list[dict[str, str]]
    peers: list[tuple[str, int]]


def echo_backend(seen: Seen) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

        def do_GET(self) -> None:
            seen.headers.append({k.lower(): v for k, v in self.headers.items()})
            seen.peers.append(self.client_address)
            body = json.dumps({"path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass
class Proxy:
    url: str
    seen: Seen


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    executable = nginx()
    directory = tmp_path_factory.mktemp("nginx")
    seen = Seen([], [])
    backend = ThreadingHTTPServer(("127.0.0.1", 0), echo_backend(seen))
    threading.Thread(target=backend.serve_forever, daemon=True).start()

    text = CONFIG.read_text()
    assert text.count(UPSTREAM) == 1
    assert text.count(LISTEN) == 1
    port = free_port()
    text = text.replace(UPSTREAM, f"server 127.0.0.1:{backend.server_address[1]};")
    text = text.replace(LISTEN, f"listen 127.0.0.1:{port};")
    (directory / "taskapp.conf").write_text(text)
    main = nginx_main(directory, f"    include {directory}/taskapp.conf;\n")
    (directory / "nginx.conf").write_text(main)

    test = subprocess.run(
        [executable, "-t", "-p", str(directory), "-c", str(directory / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert test.returncode == 0, test.stderr
    process = subprocess.Popen(
        [executable, "-p", str(directory), "-c", str(directory / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, directory)
        seen.headers.clear()
        seen.peers.clear()
        yield Proxy(url, seen)
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        backend.shutdown()
        backend.server_close()


def _wait_until_up(url: str, process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (directory / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx did not start:\n{log}") from None
            time.sleep(0.05)


def test_the_client_address_replaces_any_forwarded_for_it_sends(proxy: Proxy) -> None:
    # The API trusts this hop's X-Forwarded-For (TASKAPP_TRUSTED_PROXIES): a client must not
    # be able to put another address there and get another rate-limit bucket.
    response = httpx.get(
        f"{proxy.url}/tasks?page=2",
        headers={"X-Forwarded-For": "203.0.113.7, 10.1.2.3", "Host": "localhost:8000"},
    )
    assert response.status_code == 200
    assert response.json() == {"path": "/tasks?page=2"}
    received = proxy.seen.headers[-1]
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["host"] == "localhost:8000"
    assert response.headers["server"] == "nginx"  # server_tokens off: no version


def test_connections_to_the_api_are_kept_alive(proxy: Proxy) -> None:
    before = len(proxy.seen.peers)
    for _ in range(10):
        assert httpx.get(f"{proxy.url}/healthz").status_code == 200
    peers = proxy.seen.peers[before:]
    assert len(peers) == 10
    # One upstream connection serves them all (HTTP/1.1, no "Connection: close").
    assert len(set(peers)) == 1
    assert "close" not in proxy.seen.headers[-1].get("connection", "")
