"""Log set-up: JSON lines in production (one object per record, with the request id and
the access fields), readable text in development. Tokens and secrets are never logged:
the access line names the subject, not the credentials."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from taskapp.http.requestid import current_request_id

# Fields an access log record may carry (see observability/http.py).
ACCESS_FIELDS = ("method", "route", "path", "status", "duration_ms", "subject")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for field in ACCESS_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, *, json_lines: bool) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if json_lines:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per outgoing JWKS request is noise; failures are logged by the caller.
    logging.getLogger("httpx").setLevel(logging.WARNING)
