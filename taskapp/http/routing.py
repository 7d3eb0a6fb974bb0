"""Routes answered without FastAPI's per-request machinery, with FastAPI's semantics.

FastAPI answers every request through a general solver (a dependency graph with caching and
security scopes, every kind of parameter, its own middleware and exit stacks): for a read
the response cache answers, that was the larger part of the request's time. A `LeanRoute`
is an ordinary FastAPI route (FastAPI documents it, and would serve it the same way) whose
parameters are of the few kinds resolved here directly, in FastAPI's order and with its
validation and error shapes: the JSON body read first (strict about its content type, as
FastAPI is by default), then dependencies that resolve from the request alone, then path
and query parameters and the body, each validated by FastAPI's own field for it.
`LeanRoutes`, an ASGI middleware in front of FastAPI, serves what those routes match and
hands the rest on.

A route whose parameters are of another kind (forms, several or embedded body fields,
headers, cookies, sub-dependencies that need FastAPI) is refused when it is declared, not
served differently.
"""

from __future__ import annotations

import email.message
import enum
import inspect
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from copy import deepcopy
from functools import lru_cache
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response, params
from fastapi._compat import ModelField
from fastapi._compat.shared import field_annotation_is_sequence
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from taskapp.errors import answer_to

# What resolves a dependency from the request alone (sync, or awaitable).
RequestResolver = Callable[[Request], Any]
D = TypeVar("D", bound=Callable[..., Any])
_RESOLVER = "resolve_request"


def resolves_from_request(resolver: RequestResolver) -> Callable[[D], D]:
    """Marks a FastAPI dependency as equivalent to `resolver(request)`: what a `LeanRoute`
    calls instead of the dependency's own graph (e.g. a role check over the principal)."""

    def mark(dependency: D) -> D:
        setattr(dependency, _RESOLVER, resolver)
        return dependency

    return mark


class LeanRoute(APIRoute):
    """An APIRoute that `LeanRoutes` serves directly (see the module)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.invoke = _compile(self)


def lean_route(
    router: APIRouter, method: str, path: str, **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`@router.<method>(path, **options)`, as a `LeanRoute`."""

    def add(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(
            path, endpoint, methods=[method], route_class_override=LeanRoute, **options
        )
        return endpoint

    return add


def routes_of(*routers: APIRouter) -> list[Route]:
    """Every route of `routers`, in the order FastAPI matches them."""
    routes: list[Route] = []
    for router in routers:
        for route in router.routes:
            if not isinstance(route, Route):
                raise TypeError(f"{route!r}: only plain routes are matched by LeanRoutes")
            routes.append(route)
    return routes


class LeanRoutes:
    """Serves a request itself when the first of `routes` that matches it (method and path,
    as FastAPI matches them) is a `LeanRoute`; hands every other request to `app`.

    Errors are answered as the application's exception handlers answer them; anything else
    propagates, as it would out of FastAPI, to the error boundary outside.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[Route]) -> None:
        self.app = app
        # Each route, in order, with the text every path it matches starts with (all of it
        # when the route has no parameters): most routes are passed over by comparing strings.
        self._candidates = [
            (route, route.path_format.split("{", 1)[0], "{" not in route.path_format)
            for route in routes
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method = scope["method"]
            path = get_route_path(scope)
            for route, start, whole in self._candidates:
                if route.methods and method not in route.methods:
                    continue  # at most a partial match: FastAPI looks on too
                if (path != start) if whole else not path.startswith(start):
                    continue  # no match at all
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    if isinstance(route, LeanRoute):
                        scope.update(child_scope)
                        await self._serve(route, scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)

    @staticmethod
    async def _serve(route: LeanRoute, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route.invoke(Request(scope, receive))
        except Exception as exc:
            answer = answer_to(exc)
            if answer is None:
                raise
            response = answer
        await response(scope, receive, send)


_Invoke = Callable[[Request], Awaitable[Response]]


def _compile(route: APIRoute) -> _Invoke:
    """The route's endpoint, called with its parameters resolved as FastAPI resolves them."""
    dependant = route.dependant
    name = f"{route.path} ({route.name})"
    body_field = route.body_field
    if body_field is not None and (
        len(dependant.body_params) != 1
        or route._embed_body_fields
        or isinstance(body_field.field_info, params.Form)
        or route.strict_content_type is False
    ):
        raise TypeError(f"{name}: only one JSON body, not embedded, is served lean")
    if (
        dependant.header_params
        or dependant.cookie_params
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.response_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
    ):
        raise TypeError(
            f"{name}: only dependencies, path and query parameters and a body are served lean"
        )
    if not inspect.iscoroutinefunction(dependant.call):
        raise TypeError(f"{name}: the endpoint must be a coroutine function")
    dependencies = [_dependency(name, sub) for sub in dependant.dependencies]
    # (the name it is read by, its field)
    path_fields: list[tuple[str, ModelField]] = []
    query_fields: list[tuple[str, ModelField]] = []
    for where, declared, into in (
        ("path", dependant.path_params, path_fields),
        ("query", dependant.query_params, query_fields),
    ):
        for field in declared:
            alias = field.field_info.validation_alias or field.alias
            if not isinstance(alias, str):
                raise TypeError(f"{name}: {where} parameter {field.name} has an alias choice")
            if field_annotation_is_sequence(field.field_info.annotation):
                raise TypeError(f"{name}: {where} parameter {field.name} is a sequence")
            into.append((alias, field))
    query = _QueryParameters(query_fields)
    request_param = dependant.request_param_name
    endpoint = dependant.call
    assert endpoint is not None

    async def invoke(request: Request) -> Response:
        values: dict[str, Any] = {}
        # The body is read before anything else, as FastAPI reads it: a body that is not
        # JSON is refused before the caller's token is looked at.
        body = await _json_body(request) if body_field is not None else _MISSING
        # Dependencies next: their errors (401, 403) come before those of the input.
        for param, resolve in dependencies:
            value = resolve(request)
            values[param] = await value if inspect.isawaitable(value) else value
        errors: list[Any] = []
        path_params = request.path_params
        for key, field in path_fields:
            _validate(field, path_params.get(key, _MISSING), ("path", key), values, errors)
        query.validate(request.scope["query_string"], values, errors)
        if body_field is not None:
            _validate(body_field, body, ("body",), values, errors)
        if errors:
            raise RequestValidationError(errors)
        if request_param is not None:
            values[request_param] = request
        response = await endpoint(**values)
        if not isinstance(response, Response):
            raise TypeError(f"{name}: a lean endpoint answers with a Response")
        return response

    return invoke


# A parameter the request does not carry (None is a value: a JSON body may be `null`).
_MISSING: Any = object()


def _validate(
    field: ModelField,
    value: Any,
    loc: tuple[str, ...],
    values: dict[str, Any],
    errors: list[Any],
) -> None:
    """Validate one parameter as FastAPI does, into `values` or `errors`."""
    if value is _MISSING:
        if field.field_info.is_required():
            errors.append({"type": "missing", "loc": loc, "msg": "Field required"})
            return
        value = field.default
        if not isinstance(value, _IMMUTABLE):
            value = deepcopy(value)
        if not field.field_info.validate_default:
            values[field.name] = value
            return
    validated, problems = field.validate(value, values, loc=loc)
    if problems:
        errors.extend(problems)
    else:
        values[field.name] = validated


# Validated query strings kept per route, at most.
QUERY_STRINGS_KEPT = 1024
_IMMUTABLE = (type(None), bool, int, float, str, bytes, uuid.UUID, enum.Enum)


class _QueryParameters:
    """A route's query parameters, validated as FastAPI validates them; the values of a
    query string seen before (page 1 of a list, say) are taken as they were validated then.

    Only query strings that validated, into values that cannot change (numbers, text, UUIDs,
    enumerations, None), are kept; the values of the same string are the same every time.
    """

    __slots__ = ("_fields", "_kept")

    def __init__(self, fields: list[tuple[str, ModelField]]) -> None:
        self._fields = fields
        self._kept: dict[bytes, tuple[tuple[str, Any], ...]] = {}

    def validate(self, query_string: bytes, values: dict[str, Any], errors: list[Any]) -> None:
        if not self._fields:
            return
        kept = self._kept.get(query_string)
        if kept is not None:
            values.update(kept)
            return
        mine: dict[str, Any] = {}
        problems: list[Any] = []
        params = QueryParams(query_string)
        for key, field in self._fields:
            _validate(field, params.get(key, _MISSING), ("query", key), mine, problems)
        values.update(mine)
        if problems:
            errors.extend(problems)
        elif all(isinstance(value, _IMMUTABLE) for value in mine.values()):
            if len(self._kept) >= QUERY_STRINGS_KEPT:
                self._kept.clear()
            self._kept[query_string] = tuple(mine.items())


async def _json_body(request: Request) -> Any:
    """The request's body as FastAPI reads it: JSON when its content type says so, else the
    raw bytes (which then fail validation); `_MISSING` when there is none."""
    try:
        raw = await request.body()
        if not raw:
            return _MISSING
        content_type = request.headers.get("content-type")
        if content_type and _is_json(content_type):
            return json.loads(raw)
        return raw
    except json.JSONDecodeError as exc:
        error = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}
        raise RequestValidationError([error]) from exc
    except HTTPException:
        raise  # the body cap's 413
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


@lru_cache(maxsize=256)
def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _dependency(route: str, sub: Any) -> tuple[str, RequestResolver]:
    """(parameter, resolver) of a dependency a lean route can resolve from the request."""
    resolver = getattr(sub.call, _RESOLVER, None)
    if resolver is not None:
        return sub.name, resolver
    takes_only_the_request = (
        sub.request_param_name is not None
        and not sub.dependencies
        and not sub.path_params
        and not sub.query_params
        and not sub.header_params
        and not sub.cookie_params
        and not sub.body_params
    )
    if not takes_only_the_request or not inspect.iscoroutinefunction(sub.call):
        raise TypeError(
            f"{route}: dependency {sub.name} must be `async def f(request: Request)` "
            "or marked with resolves_from_request"
        )
    call, param = sub.call, sub.request_param_name

    def resolve(request: Request) -> Any:
        return call(**{param: request})

    return sub.name, resolve
