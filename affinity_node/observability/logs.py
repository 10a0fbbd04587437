"""Logging helpers: rate limiting, so an outage produces a line per interval, not per request."""

from __future__ import annotations

import logging
import time


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
