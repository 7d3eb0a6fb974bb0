"""Responses made of JSON bytes the service serialized (and perhaps cached) itself."""

from __future__ import annotations

from fastapi import Response, status
from fastapi.responses import JSONResponse


def json_bytes(body: bytes, status_code: int = status.HTTP_200_OK) -> Response:
    """A JSON response whose body is `body` as it is."""
    return Response(content=body, status_code=status_code, media_type=JSONResponse.media_type)
