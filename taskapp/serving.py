"""uvicorn's HTTP protocol, with TCP_NODELAY on every accepted connection.

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


class NoDelayHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that sets TCP_NODELAY on its connection first."""

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        set_nodelay(transport)
        super().connection_made(transport)


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
