"""GET /metrics of the processes without an HTTP API: `taskapp worker` and `taskapp beat`.

The standard library's threaded WSGI server (what prometheus_client's own
`start_http_server` runs) in a daemon thread of the main process, so a scrape never waits
for a job and a job never waits for a scrape. It adds what that one lacks: the bearer token
of TASKAPP_METRICS_TOKEN, checked as the API's /metrics checks it, and one path.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder
from pydantic import SecretStr

from taskapp.auth.errors import NotAuthenticatedError
from taskapp.errors import MethodNotAllowedError, NotFoundError, error_body
from taskapp.observability.scrape import is_scrape_token

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PATH = "/metrics"


class _Handler(WSGIRequestHandler):
    # A client that connects and then says nothing gives up its thread after this long.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one every few seconds says nothing."""


def metrics_app(
    registry: Callable[[], CollectorRegistry], token: SecretStr | None
) -> WSGIApplication:
    """The WSGI application: `registry()` in Prometheus text (or OpenMetrics when the Accept
    header asks), to requests bearing `token` when there is one."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        if environ.get("PATH_INFO") != PATH:
            detail = f"Not found; metrics are at {PATH}"
            return _error(start_response, "404 Not Found", detail, NotFoundError.code)
        if method not in ("GET", "HEAD"):
            return _error(
                start_response,
                "405 Method Not Allowed",
                "Method not allowed",
                MethodNotAllowedError.code,
                ("Allow", "GET, HEAD"),
            )
        if token is not None and not is_scrape_token(environ.get("HTTP_AUTHORIZATION", ""), token):
            # As RFC 6750 asks of a request without (valid) credentials.
            return _error(
                start_response,
                "401 Unauthorized",
                NotAuthenticatedError.default_detail,
                NotAuthenticatedError.code,
                ("WWW-Authenticate", "Bearer"),
            )
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        body = encoder(registry())
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body] if method == "GET" else []

    return app


def _error(
    start_response: StartResponse, status: str, detail: str, code: str, *headers: tuple[str, str]
) -> list[bytes]:
    """The service's one error shape, {"detail": ..., "code": ...}."""
    body = error_body(detail, code)
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return [body]


class MetricsServer:
    """The listener and its thread. Bound on creation, so a port in use fails at once."""

    def __init__(self, host: str, port: int, app: WSGIApplication) -> None:
        [(family, *_), *_] = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )

        class Server(ThreadingWSGIServer):
            address_family = family  # an IPv6 address needs an IPv6 socket

        self._httpd = make_server(host, port, app, Server, handler_class=_Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-server", daemon=True
        )
        # Celery forks its pool processes (and an embedded beat) after this: none of them
        # serves, so none keeps the listening socket open (it would hold the port after
        # this process is gone).
        os.register_at_fork(after_in_child=self._httpd.socket.close)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


def start_metrics_server(
    host: str, port: int, registry: Callable[[], CollectorRegistry], token: SecretStr | None
) -> MetricsServer:
    """Serve `registry()` at http://host:port/metrics from now on; OSError if it cannot."""
    server = MetricsServer(host, port, metrics_app(registry, token))
    server.start()
    return server
