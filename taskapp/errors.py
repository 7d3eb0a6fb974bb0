"""One error shape for the whole API, `{"detail": ..., "code": ...}`, and what produces it.

`detail` is human text and never changes for a given failure (the task 404 is exactly `Task
not found`); `code` is a stable identifier that clients match on. Every expected failure is
an `AppError` subclass naming its status and code; the subclasses register themselves, so
the OpenAPI document and `docs/errors.md` list every code there is. Validation errors keep
FastAPI's list of `{loc, msg, type}` as their `detail`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class AppError(Exception):
    """An expected failure: raised below the routes, answered as `{"detail", "code"}`."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # When it happens, in a few words: the OpenAPI document and docs/errors.md show it.
    summary: ClassVar[str] = "Unexpected error; the X-Request-ID header identifies it in the logs"
    # The `detail` of an error raised without one.
    default_detail: ClassVar[str] = "Internal Server Error"

    # Every code there is, by code: filled in as subclasses are defined.
    registry: ClassVar[dict[str, type[AppError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            known = AppError.registry.setdefault(cls.code, cls)
            if known is not cls:
                raise TypeError(f"error code {cls.code!r} is taken by {known.__qualname__}")

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None):
        self.detail = detail if detail is not None else self.default_detail
        super().__init__(self.detail)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return error_response(self.status_code, self.detail, self.code, self.headers)


AppError.registry[AppError.code] = AppError


class BadRequestError(AppError):
    status_code = 400
    code = "malformed_body"
    summary = "The body could not be read as JSON text"
    default_detail = "There was an error parsing the body"


class ForbiddenError(AppError):
    status_code = 403
    code = "forbidden"
    summary = "The caller may see this, but not do it (a role or a rule forbids it)"
    default_detail = "Insufficient role for this operation"


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"
    summary = "No such path"
    default_detail = "Not Found"


class MethodNotAllowedError(AppError):
    status_code = 405
    code = "method_not_allowed"
    summary = "The path does not answer this method"
    default_detail = "Method Not Allowed"


class BodyTooLargeError(AppError):
    status_code = 413
    code = "body_too_large"
    summary = "The request body is larger than the configured limit"
    default_detail = "Request body too large"


class HeadTooLargeError(AppError):
    """Answered by `taskapp serve` itself (taskapp.http.server), before any route sees the
    request; the connection is closed after it."""

    status_code = 431
    code = "headers_too_large"
    summary = "The request line and headers exceed 64 KiB (taskapp serve); the connection closes"
    default_detail = "Request header fields too large"


class ServiceUnavailableError(AppError):
    """A backing service cannot serve the request now; retried after `Retry-After`."""

    status_code = 503
    retry_after = 1

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(detail, headers={"Retry-After": str(self.retry_after), **(headers or {})})


class ValidationFailed:
    """Stands for FastAPI's RequestValidationError in the list of codes."""

    status_code = 422
    code = "validation_failed"
    summary = "The input broke a rule: `detail` lists each problem as {loc, msg, type}"


# -- the bodies ---------------------------------------------------------------------------


def error_response(
    status_code: int, detail: Any, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status_code, headers=headers)


def error_body(detail: str, code: str) -> bytes:
    """The bytes of an error body, for answers made outside FastAPI (the server, the worker's
    metrics listener)."""
    return json.dumps({"detail": detail, "code": code}, separators=(",", ":")).encode()


class ErrorResponse(BaseModel):
    """The body of every error response but a validation error."""

    detail: str = Field(description="What went wrong, in words; fixed for each failure")
    code: str = Field(description="A stable identifier of the failure, to match on")


class ValidationProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    """The body of a 422: each problem with the input."""

    detail: list[ValidationProblem]
    code: str = Field(ValidationFailed.code, description="Always `validation_failed`")


# -- the OpenAPI document -------------------------------------------------------------------

_HEADER_TYPES: dict[str, dict[str, Any]] = {
    "WWW-Authenticate": {"description": 'Bearer challenge, e.g. error="invalid_token"'},
    "Retry-After": {"description": "Seconds to wait before retrying"},
    "RateLimit-Limit": {"description": "Requests allowed per window"},
    "RateLimit-Remaining": {"description": "Requests left in the current window"},
    "RateLimit-Reset": {"description": "Seconds until the full quota is available again"},
}
_HEADERS_BY_STATUS = {
    401: ["WWW-Authenticate"],
    429: ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"],
    503: ["Retry-After"],
}

ErrorKind = type[AppError] | type[ValidationFailed]


def error_responses(*errors: ErrorKind) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for `errors`: one per status, naming each of its codes
    with an example body."""
    by_status: dict[int, list[ErrorKind]] = {}
    for error in errors:
        by_status.setdefault(error.status_code, []).append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status_code, kinds in sorted(by_status.items()):
        entry: dict[str, Any] = {
            "description": "; ".join(f"`{kind.code}`: {kind.summary}" for kind in kinds),
            "model": ValidationErrorResponse if status_code == 422 else ErrorResponse,
        }
        examples = {
            kind.code: {"summary": kind.summary, "value": _example(kind)}
            for kind in kinds
            if issubclass(kind, AppError)
        }
        if examples:
            entry["content"] = {"application/json": {"examples": examples}}
        if headers := _HEADERS_BY_STATUS.get(status_code):
            entry["headers"] = {name: {**_HEADER_TYPES[name], "schema": {"type": "string"}}
                                for name in headers}  # fmt: skip
        responses[status_code] = entry
    return responses


def _example(kind: type[AppError]) -> dict[str, str]:
    return {"detail": kind.default_detail, "code": kind.code}


def every_code() -> list[ErrorKind]:
    """Every error the API can answer with, by status."""
    kinds: list[ErrorKind] = [*AppError.registry.values(), ValidationFailed]
    return sorted(kinds, key=lambda kind: (kind.status_code, kind.code))


def describe_codes(kinds: Iterable[ErrorKind]) -> str:
    """A Markdown table of `kinds`: status, code, when."""
    rows = [f"| {kind.status_code} | `{kind.code}` | {kind.summary} |" for kind in kinds]
    return "\n".join(["| status | code | when |", "|---|---|---|", *rows])


def invalid(*problems: tuple[tuple[str | int, ...], str, str]) -> RequestValidationError:
    """A 422 `validation_failed` for input that broke a rule only the service can check:
    each problem is (loc, msg, type), as FastAPI reports its own."""
    return RequestValidationError(
        [{"loc": loc, "msg": msg, "type": kind} for loc, msg, kind in problems]
    )


# -- the handlers ---------------------------------------------------------------------------

# Starlette's own errors (an unknown path or method, a body FastAPI could not parse, a body
# over the limit while it streams in), by status.
_HTTP_ERRORS: dict[int, type[AppError]] = {
    error.status_code: error
    for error in (BadRequestError, NotFoundError, MethodNotAllowedError, BodyTooLargeError)
}


def answer_to(exc: Exception) -> JSONResponse | None:
    """The response to an expected failure (an `AppError`, invalid input, or one of
    Starlette's HTTP errors); None for anything else, which is a bug."""
    if isinstance(exc, AppError):
        if exc.status_code >= 500:
            logger.warning("%s: %s (%r)", exc.code, exc.detail, exc.__cause__)
        return exc.response()
    if isinstance(exc, RequestValidationError):
        # Only loc/msg/type: echoing the input could return megabytes, secrets or raw bytes.
        errors = [
            {"loc": list(error["loc"]), "msg": str(error["msg"]), "type": error["type"]}
            for error in exc.errors()
        ]
        return error_response(422, errors, ValidationFailed.code)
    if isinstance(exc, StarletteHTTPException):
        kind = _HTTP_ERRORS.get(exc.status_code, AppError)
        return error_response(exc.status_code, exc.detail, kind.code, exc.headers)
    return None


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    response = answer_to(exc)
    assert response is not None  # registered only for the kinds answer_to answers
    return response


def install_error_handlers(app: FastAPI) -> None:
    for kind in (AppError, StarletteHTTPException, RequestValidationError):
        app.add_exception_handler(kind, _handler)
