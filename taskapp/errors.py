"""One error shape for the whole API: `{"detail": ...}`, and the handlers that produce it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from taskapp.auth.errors import InvalidTokenError, ProviderUnavailableError
from taskapp.db import DatabaseUnavailableError, unavailable_reason

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


_DESCRIPTIONS = {
    401: "Missing, malformed, expired or otherwise invalid bearer token",
    403: "The token lacks a role this operation needs",
    404: "Not found, or not visible to the caller",
    503: "A backing service (database, identity provider) is unavailable; retry later",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the given error statuses."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


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
    detail = exc.detail if isinstance(exc, DatabaseUnavailableError) else None
    detail = detail or unavailable_reason(exc) or "Database unavailable"
    logger.warning("database unavailable: %s (%s)", detail, exc.__cause__ or exc)
    return _error(503, detail, {"Retry-After": "1"})


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
