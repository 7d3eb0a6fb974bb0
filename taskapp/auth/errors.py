"""Authentication failures: 401 with a Bearer challenge, or 503 when the provider's keys
cannot be had."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from taskapp.errors import AppError, ServiceUnavailableError


class InvalidTokenError(AppError):
    """The bearer token is malformed, or fails verification."""

    status_code = 401
    code = "token_invalid"
    summary = "The bearer token is malformed, or fails verification (`detail` says why)"
    default_detail = "Invalid token"
    # RFC 6750: the challenge names the error, but for a request that sent no credentials.
    challenge: ClassVar[str] = 'Bearer error="invalid_token"'

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(detail, headers={"WWW-Authenticate": self.challenge, **(headers or {})})


class NotAuthenticatedError(InvalidTokenError):
    code = "not_authenticated"
    summary = "No bearer token was sent"
    default_detail = "Not authenticated"
    challenge = "Bearer"


class TokenExpiredError(InvalidTokenError):
    code = "token_expired"
    summary = "The bearer token has expired: get a new one"
    default_detail = "Token expired"


class ProviderUnavailableError(ServiceUnavailableError):
    """The identity provider's keys cannot be fetched and none are cached."""

    code = "identity_provider_unavailable"
    summary = "The identity provider's keys cannot be fetched"
    default_detail = "Identity provider unavailable"
    retry_after = 5


class ProviderMisconfiguredError(ProviderUnavailableError):
    """The provider answers, but not as configured: its discovery document names another
    issuer than the one tokens are checked against."""

    code = "identity_provider_misconfigured"
    summary = "The identity provider does not match the API's configuration (`detail` says how)"
    default_detail = "Identity provider misconfigured"
    retry_after = 30
