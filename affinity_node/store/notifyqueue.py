"""How full Postgres's NOTIFY queue is, read off the request path.

Every node's coherence rides on NOTIFY. The queue is trimmed only up to the slowest listening
session: one that LISTENs and then sits in a transaction holds its tail, and once the queue is
full every notifying commit fails, fleet-wide. The node reads `pg_notification_queue_usage()`
on its database pool every few seconds and the collector exports the last answer
(`affinity_notify_queue_usage`), so an alert fires long before that.
"""

from __future__ import annotations

import logging

import asyncpg

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.store.postgres import DB_ERRORS
from affinity_node.store.queries import QUERIES as Q
from affinity_node.tasks import Periodic, every

log = logging.getLogger(__name__)


class NotifyQueueMonitor:
    def __init__(
        self,
        db: asyncpg.Pool | asyncpg.Connection,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
    ) -> None:
        self._db = db
        self.interval_s = interval_s
        self._timeout = timeout_s
        self._warn = RateLimitedLog(log)
        self.usage: float | None = None
        """The last answer (0-1); None while Postgres does not answer (no sample is exported:
        a stale value would hide an outage)."""

    async def read_once(self) -> float | None:
        try:
            value = await self._db.fetchval(Q["notify_queue_usage"], timeout=self._timeout)
        except DB_ERRORS as exc:
            self._warn.warning("notify-queue", "cannot read the NOTIFY queue usage: %r", exc)
            self.usage = None
        else:
            self.usage = float(value)
        return self.usage

    def start(self) -> Periodic:
        """A reading now, then one every interval, until stopped."""
        return every(self.interval_s, self.read_once, "notify-queue", now=True)
