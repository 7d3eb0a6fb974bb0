"""Authentication failures, mapped to HTTP by the app's exception handlers."""


class InvalidTokenError(Exception):
    """The bearer token is missing, malformed, or fails verification (401)."""

    def __init__(self, detail: str, *, missing: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        # RFC 6750: a request with no credentials gets a challenge without an error code.
        self.missing = missing


class ProviderUnavailableError(Exception):
    """The identity provider's keys cannot be fetched and none are cached (503)."""
