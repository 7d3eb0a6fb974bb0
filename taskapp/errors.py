"""One error shape for the whole API: `{"detail": ...}`, and the handlers that produce it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from taskapp.auth.errors import InvalidTokenError, ProviderUnavailableError
from taskapp.db import DatabaseUnavailableError

logger = logging.getLogger(__name__)


class AppError(Exception):
    """An expected failure with an HTTP status; raised by services, rendered by the app."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFoundError(AppError):
    status_code = status.HTTP_404_NOT_FOUND


class ForbiddenError(AppError):
    status_code = status.HTTP_403_FORBIDDEN


class ErrorResponse(BaseModel):
    """The body of every error response except validation errors."""

    detail: str


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "schema": {"type": "string"}}


_RESPONSES: dict[int, dict[str, Any]] = {
    400: {"description": "The body could not be read as JSON text"},
    401: {
        "description": "Missing, malformed, expired or otherwise invalid bearer token",
        "headers": {"WWW-Authenticate": _header('Bearer challenge, e.g. error="invalid_token"')},
    },
    403: {"description": "The token lacks a role this operation needs"},
    404: {"description": "Not found, or not visible to the caller"},
    413: {"description": "The request body is larger than the configured limit"},
    429: {
        "description": "Too many requests from this caller; retry after Retry-After seconds",
        "headers": {
            "Retry-After": _header("Seconds until a request will be accepted"),
            "RateLimit-Limit": _header("Requests allowed per window"),
            "RateLimit-Remaining": _header("Requests left in the current window"),
            "RateLimit-Reset": _header("Seconds until the full quota is available again"),
        },
    },
    500: {"description": "Unexpected error; the X-Request-ID header identifies it in the logs"},
    503: {
        "description": "A backing service (database, identity provider) is unavailable",
        "headers": {"Retry-After": _header("Seconds to wait before retrying")},
    },
}


# Not from the app: `taskapp serve` (taskapp.serving) answers a request whose head is over
# its limit before any route sees it, in plain text, and closes the connection.
HEAD_TOO_LARGE: dict[int | str, dict[str, Any]] = {
    431: {
        "description": "The request line and headers exceed 64 KiB (taskapp serve); "
        "the connection is closed",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses."""
    return {code: {"model": ErrorResponse, **_RESPONSES[code]} for code in codes}


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return _error(exc.status_code, exc.detail)


async def _invalid_token(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidTokenError)
    challenge = "Bearer" if exc.missing else 'Bearer error="invalid_token"'
    return _error(401, exc.detail, {"WWW-Authenticate": challenge})


async def _provider_unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("identity provider unavailable: %s", exc)
    return _error(503, "Identity provider unavailable", {"Retry-After": "5"})


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatabaseUnavailableError)
    logger.warning("database unavailable: %s (%r)", exc.detail, exc.__cause__)
    return _error(503, exc.detail, {"Retry-After": "1"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only loc/msg/type: echoing the input could return megabytes, secrets or raw bytes.
    errors = [
        {"loc": list(error["loc"]), "msg": str(error["msg"]), "type": error["type"]}
        for error in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(InvalidTokenError, _invalid_token)
    app.add_exception_handler(ProviderUnavailableError, _provider_unavailable)
    app.add_exception_handler(DatabaseUnavailableError, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
