"""The usage ledger: per (API key, model, backend, hour), the tokens the backends reported and
what routing did, counted in memory by the request path and added to Postgres in batches.

- `record` is all a request pays: a dict lookup, two additions and the bytes of its usage
  object appended to its row; no decoding, no await, no database. The usage objects are
  decoded row by row, a batch at a time (`digest`: one regex scan over a row's joined
  objects, sums in C), every `digest_every` answers (scheduled right after the request that
  fills the batch) and before every flush.
- Every `flush_interval_s` one statement adds what was counted since the last flush
  (upsert-add, so nodes add to the same rows). The batch carries this ledger's writer id and
  a sequence number that the database claims in the same statement: a batch whose answer was
  lost (a timeout, a frozen connection) is sent again as it was, and counts once whether or
  not the first attempt landed. Meanwhile new counts wait in memory; after a database outage
  nothing is lost unless the memory bound was reached.
- Memory is bounded: with `max_rows` rows waiting, requests that would need a new row are
  counted as dropped (`affinity_ledger_dropped_requests_total{reason="full"}`).
- One node at a time (advisory lock) deletes rows past the retention.

Hours are the node's wall clock (UTC epoch / 3600): nodes synchronised by NTP agree on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from affinity_node.ledger.ports import (
    COUNT_COLUMNS,
    TOKEN_COLUMNS,
    LedgerKey,
    LedgerRow,
    LedgerStore,
    LedgerUnavailable,
)
from affinity_node.ledger.usage import add_usages
from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import LedgerMetrics
from affinity_node.tasks import Periodic, every, stop_all
from affinity_node.vocabulary import LEDGER_OUTCOMES, LedgerOutcome

log = logging.getLogger(__name__)

_WIDTH: Final = len(COUNT_COLUMNS)
_OUTCOME_INDEX: Final[dict[LedgerOutcome, int]] = {
    o: len(TOKEN_COLUMNS) + i for i, o in enumerate(LEDGER_OUTCOMES)
}


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    flush_interval_s: float = 5.0
    retention_s: float = 90 * 86400.0
    max_rows: int = 100_000
    """Rows waiting in memory (each one (key, model, backend, hour)); a failed batch waiting
    to be sent again counts too."""
    cleanup_interval_s: float = 600.0
    cleanup_batch: int = 5000
    digest_every: int = 2048
    """Usage objects recorded before they are decoded (bounds their memory)."""
    max_rejections: int = 3
    """A batch the database refuses this many times is dropped (a retry fixes a key deleted
    mid-flush; it cannot fix a bad value)."""
    stop_timeout_s: float = 5.0


class _Row:
    """One (key, model, backend, hour): its counts, and usage objects not decoded yet."""

    __slots__ = ("counts", "usages")

    def __init__(self) -> None:
        self.counts = [0] * _WIDTH
        self.usages: list[bytes] = []


@dataclass(slots=True)
class _Batch:
    seq: int
    rows: list[LedgerRow]
    requests: int
    rejections: int = 0


class NullLedger:
    """The ledger while `ledger.enabled` is off: records nothing, so the request path calls it
    as it would the real one (no None check) and asks `enabled` before any usage work."""

    enabled: Final = False

    def record(
        self,
        api_key_id: uuid.UUID,
        model: str,
        backend: str,
        outcome: LedgerOutcome,
        usage: bytes | None,
    ) -> None:
        pass

    def count_unreported(self) -> None:
        pass

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class UsageLedger:
    enabled: Final = True
    """Whether answers' usage is worth reading (see `NullLedger`)."""

    def __init__(
        self,
        store: LedgerStore,
        metrics: LedgerMetrics,
        node_id: str,
        settings: LedgerSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._m = metrics
        self._node_id = node_id
        self._s = settings or LedgerSettings()
        self._clock = clock
        self.writer = uuid.uuid4()
        """This ledger's identity in usage_ledger_writers (one per node process)."""
        self._seq = itertools.count(1)
        self._rows: dict[LedgerKey, _Row] = {}
        self._undecoded = 0
        self._digest_soon: asyncio.Handle | None = None
        self._unsent: _Batch | None = None
        self._task: Periodic | None = None
        self._last_cleanup = -float("inf")
        self._warn = RateLimitedLog(log)
        metrics.pending.set_function(lambda: float(self.pending_rows))

    @property
    def pending_rows(self) -> int:
        return len(self._rows) + (len(self._unsent.rows) if self._unsent is not None else 0)

    def record(
        self,
        api_key_id: uuid.UUID,
        model: str,
        backend: str,
        outcome: LedgerOutcome,
        usage: bytes | None,
    ) -> None:
        """One answered request, `usage` its usage object's bytes (on the request path: no
        I/O, no decoding)."""
        key = (api_key_id, model, backend, int(self._clock() // 3600))
        row = self._rows.get(key)
        if row is None:
            if self.pending_rows >= self._s.max_rows:
                self._m.dropped.labels("full").inc()
                return
            row = self._rows[key] = _Row()
        counts = row.counts
        counts[0] += 1
        counts[_OUTCOME_INDEX[outcome]] += 1
        if usage is not None:
            row.usages.append(usage)
            self._undecoded += 1
            if self._undecoded >= self._s.digest_every and self._digest_soon is None:
                self._digest_soon = asyncio.get_running_loop().call_soon(self.digest)

    def count_unreported(self) -> None:
        self._m.unreported.inc()

    def digest(self) -> None:
        """Decodes the usage objects recorded so far into their rows' token counts."""
        self._digest_soon = None
        self._undecoded = 0
        unreported = 0
        for row in self._rows.values():
            if row.usages:
                unreported += add_usages(row.counts, row.usages)
                row.usages = []
        if unreported:
            self._m.unreported.inc(unreported)

    # -- flushing ----------------------------------------------------------------------------

    async def flush(self) -> bool:
        """Sends one batch: the one that failed last time, as it was, else everything counted
        since. True when nothing is left over from before (this batch landed or was empty)."""
        self.digest()
        if self._unsent is None:
            if not self._rows:
                return True
            rows, self._rows = self._rows, {}
            ordered = sorted((k, r.counts) for k, r in rows.items())  # one order on every node
            self._unsent = _Batch(next(self._seq), ordered, sum(c[0] for _, c in ordered))
        batch = self._unsent
        try:
            await self._store.add(self.writer, self._node_id, batch.seq, batch.rows)
        except LedgerUnavailable as exc:
            self._m.flush_errors.inc()
            if exc.rejected:
                batch.rejections += 1
                if batch.rejections >= self._s.max_rejections:
                    self._unsent = None
                    self._m.dropped.labels("rejected").inc(batch.requests)
                    log.error(
                        "usage ledger: the database refused a batch %d times, dropped "
                        "(%d requests): %s",
                        batch.rejections,
                        batch.requests,
                        exc,
                    )
                    return False
            self._warn.warning(
                "ledger-flush",
                "usage ledger: cannot write (%d rows wait in memory): %s",
                self.pending_rows,
                exc,
            )
            return False
        self._unsent = None
        self._m.writes.inc()
        return True

    async def cleanup(self) -> int:
        """Deletes rows past the retention, batch after batch, unless another node is at it."""
        deleted = 0
        while True:
            n = await self._store.delete_expired(self._s.retention_s, self._s.cleanup_batch)
            if n is None:
                return deleted
            deleted += n
            if n < self._s.cleanup_batch:
                return deleted

    async def _round(self) -> None:
        """One flush, and a cleanup when one is due (a bug ends the round, not the ledger)."""
        await self.flush()
        now = time.monotonic()
        if now - self._last_cleanup >= self._s.cleanup_interval_s:
            self._last_cleanup = now
            try:
                await self.cleanup()
            except LedgerUnavailable as exc:
                self._warn.warning("ledger-cleanup", "usage ledger: cleanup failed: %s", exc)

    def start(self) -> None:
        self._task = every(self._s.flush_interval_s, self._round, "usage-ledger")

    async def stop(self) -> None:
        """Stops the loop, then writes what is left (a batch left over and the rest: two
        statements at most), within `stop_timeout_s`."""
        if self._digest_soon is not None:
            self._digest_soon.cancel()
        await stop_all(self._task)
        self._task = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._s.stop_timeout_s):
                if await self.flush():
                    await self.flush()
        self.digest()
        lost = sum(r.counts[0] for r in self._rows.values())
        if self._unsent is not None:
            lost += self._unsent.requests
        if lost:
            self._m.dropped.labels("shutdown").inc(lost)
            log.warning("usage ledger: %d requests not written (database unreachable)", lost)


Ledger = UsageLedger | NullLedger
"""What the request path records to: the ledger, or the null one when it is off."""
