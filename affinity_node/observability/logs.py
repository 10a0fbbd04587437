"""Logging: request ids on every line, JSON lines, secret scrubbing, rate limiting.

The HTTP middleware sets `REQUEST_ID` for the duration of each request (a context variable,
so tasks started while handling it inherit it); `RequestContextFilter` copies it onto every
record a handler emits, so a line logged deep in the pool or the engine names the request.

What never reaches a log line above debug: an API key (the filter masks anything shaped like
one, as a last line of defence), or an API key id together with a model (call sites log
backends and operations, never pairs).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import IO, Final

REQUEST_ID: ContextVar[str | None] = ContextVar("affinity_request_id", default=None)
"""The id of the request being handled by the current task, if any."""

_SECRET: Final = re.compile(r"(?<![A-Za-z0-9_])sk-[A-Za-z0-9_\-]{6,}")
_MASK: Final = "sk-***"

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestContextFilter(logging.Filter):
    """Adds `request_id` to each record ("-" outside a request) and masks API keys.

    Attach it to handlers (filters on a logger do not see records propagated from its
    children). It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get() or "-"
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, not the caller
            return True
        if "sk-" in message:
            masked = _SECRET.sub(_MASK, message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


class RateLimitedLog:
    """Logs a message at most once per `interval` seconds per key, counting the suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d similar suppressed)"
            args = (*args, skipped)
        self._logger.warning(msg, *args)


def _request_id(record: logging.LogRecord) -> str | None:
    rid = getattr(record, "request_id", None)
    if rid is None:
        rid = REQUEST_ID.get()
    return None if rid in (None, "", "-") else str(rid)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _request_id(record)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """Human-readable lines; `[request id]` or `[-]` outside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get() or "-"
        return super().format(record)


def configure_logging(level: str, json_lines: bool, stream: IO[str] | None = None) -> None:
    """The process's logging: one handler on the root logger (stderr unless `stream`)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
