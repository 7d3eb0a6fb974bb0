"""The benchmark's server: `taskapp serve` plus one ceiling endpoint in the same process stack.

`GET /bench/ceiling` passes the same middleware (request id, metrics, rate limit with token
verification, body limit) and the same role check as `GET /tasks`, then returns a fixed body
of `?size=` bytes: the best this stack can do on this machine for that request.
Run as `python -m bench.server HOST PORT WORKERS`, configured by the usual TASKAPP_* variables.
"""

from __future__ import annotations

import sys
from functools import cache
from typing import Annotated

from fastapi import FastAPI, Query, Response

from taskapp.auth.dependencies import UserPrincipal
from taskapp.cli import serve_app
from taskapp.config import get_settings


def create_app() -> FastAPI:
    from taskapp.app import create_app as create_taskapp

    app = create_taskapp(get_settings())

    @cache
    def body(size: int) -> bytes:
        return b'{"x":"' + b"x" * max(0, size - 8) + b'"}'

    @app.get("/bench/ceiling", include_in_schema=False)
    async def ceiling(
        principal: UserPrincipal, size: Annotated[int, Query(ge=8, le=1 << 20)] = 64
    ) -> Response:
        return Response(content=body(size), media_type="application/json")

    return app


if __name__ == "__main__":
    host, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    serve_app(get_settings(), host, port, workers, app="bench.server:create_app")
