"""uvicorn's HTTP protocol, with TCP_NODELAY on every accepted connection and a limit on
the size of a request's head.

asyncio disables Nagle's algorithm on an accepted socket only when the socket reports
`proto == IPPROTO_TCP`. uvicorn's multi-worker supervisor (`--workers N`, how `taskapp
serve` runs) and its `--fd` path hand the workers a listener created with `proto` 0 (or
as AF_UNIX), so their connections keep Nagle on: the small write that ends each response
then waits for the client's delayed ACK, about 40 ms per keep-alive request on Linux
(Kludex/uvicorn#3149). uvloop sets the option itself; this protocol makes it hold under
any event loop and any way of binding.

Use `uvicorn.run(..., http=HTTP_PROTOCOL)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from unittest import mock

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import multiprocess
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from taskapp.errors import HeadTooLargeError, error_body

logger = logging.getLogger("uvicorn.error")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on the transport's socket, if it is a TCP socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    # Not decided by `sock.family`: under `--fd` uvicorn labels every socket AF_UNIX, TCP or
    # not. A Unix socket refuses the option (an OSError, ignored); a TCP one takes it.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops, and uvicorn answers the request."""


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that sets TCP_NODELAY on its connection first, and refuses a
    request whose head (request line and headers) is larger than `MAX_HEAD_BYTES` with
    431, closing the connection.

    httptools keeps a header however long it grows: without a limit, one request's head
    could hold megabytes of a worker's memory (a 10 MB header was answered 200).
    The parsed request line and headers are counted exactly; and while a head is still
    incomplete, the bytes received for it are counted too, so one that never ends is cut
    off at most one read (asyncio reads up to 256 KiB) past the limit.
    """

    # Far above any real head: a Keycloak access token with many roles is a few KiB.
    MAX_HEAD_BYTES = 64 * 1024

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        set_nodelay(transport)
        self._in_head = True
        self._received = 0  # bytes received while the head is incomplete
        self._parsed = 0  # bytes of the head parsed so far
        self._too_large = False
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:
            self._received += len(data)
        super().data_received(data)
        if self._in_head and self._received > self.MAX_HEAD_BYTES:
            self._too_large = True
            self.send_400_response("")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next request on this connection starts its head
        self._received = self._parsed = 0

    def _count(self, size: int) -> None:
        self._parsed += size
        if self._parsed > self.MAX_HEAD_BYTES:
            self._too_large = True
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        if self.transport.is_closing():
            return
        body = error_body(HeadTooLargeError.default_detail, HeadTooLargeError.code)
        self.logger.warning("Request head over %d bytes refused.", self.MAX_HEAD_BYTES)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


# The value for uvicorn's `http=` option (a string survives the trip to worker processes).
HTTP_PROTOCOL = f"{__name__}:{NoDelayHttpToolsProtocol.__qualname__}"


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class _OwnListenerProcess(Process):
    """A worker that listens on a SO_REUSEPORT socket of its own instead of the shared one."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        for inherited in sockets or []:
            inherited.close()
        try:
            own = reuseport_socket(self.config.host, self.config.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc)
            # The supervisor stops instead of restarting a worker that can never start.
            sys.exit(STARTUP_FAILURE)
        super().target([own])


def run_workers(config: uvicorn.Config) -> None:
    """Serve `config` with `config.workers` processes, each with its own listening socket.

    With one listener shared by all workers, whichever worker wakes first accepts every
    connection waiting in the queue; long-lived keep-alive connections (a proxy's, a load
    generator's) then pile onto one worker while the others idle. Here every worker listens
    on its own SO_REUSEPORT socket and the kernel spreads new connections across them.
    The parent holds a bound, never-listening socket on the port, so a port taken by a
    plain listener fails at start, as before (port 0 picks one port for all workers).

    What SO_REUSEPORT changes: another process of the same user that also sets it (a second
    `taskapp serve` on the same port) is let in and shares the traffic instead of failing;
    connections still queued on a worker's own listener when that worker exits are reset
    (Linux >= 5.14 hands them to the others with `net.ipv4.tcp_migrate_req=1`).
    """
    if config.uds or config.fd is not None:
        raise ValueError("per-worker listeners are for TCP host/port only")
    reservation = reuseport_socket(config.host, config.port)
    config.port = reservation.getsockname()[1]
    logger.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", config.host, config.port)
    with contextlib.ExitStack() as stack:
        stack.callback(reservation.close)
        # uvicorn's supervisor (restarts, health checks, signals) creates its workers from the
        # module-level `Process`; point it at ours for as long as the supervisor runs.
        stack.enter_context(mock.patch.object(multiprocess, "Process", _OwnListenerProcess))
        Multiprocess(config, sockets=[reservation]).run()
