"""Log set-up: every record carries the request id of the request that produced it."""

from __future__ import annotations

import logging

from taskapp.observability.requestid import current_request_id


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per outgoing JWKS request is noise; failures are logged by the caller.
    logging.getLogger("httpx").setLevel(logging.WARNING)
