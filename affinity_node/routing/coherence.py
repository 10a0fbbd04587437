"""Coherence: how the binding cache stays equal to the table while the node serves from it.

A notification is a doorbell, never believed by itself (routing/trust.py): it makes the node
read what changed after its watermark from the table, one coalesced read for a burst, and only
rows read from the table move, evict or add a cached pair. Staleness is bounded: while the
listener is down, entries the database has not confirmed for `blind_max_age_s` are re-read
before they are used (`stale_before`, which the engine reads on every hit).

Resync after each LISTEN costs what changed: the listener proves a watermark (every change up
to version W reached this node, store/listener.py), and a reconnect reads the rows changed
after W plus the deletions the table logged after W. Only when the log no longer reaches back
to W (or far more changed) does the node read every live binding, in pages, in the background:
it serves meanwhile, pairs not loaded yet are read like misses, and entries from before the
reload are re-read before use until the reload has confirmed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.ports import (
    BindingEvent,
    BindingStore,
    Changes,
    Clock,
    Pair,
    SnapshotPage,
    StoreUnavailable,
)
from affinity_node.routing.trust import plausible_lag, read_start
from affinity_node.tasks import stop_all
from affinity_node.vocabulary import NOTIFY_OPS, ResyncMode, SnapshotState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SyncStatus:
    """The latest resync, as /readyz reports it."""

    state: SnapshotState = "waiting"
    mode: ResyncMode | None = None
    loaded: int = 0
    """Bindings the current (or last) full snapshot stored."""
    expected: int = 0
    """About how many rows the table holds (the planner's estimate, for progress)."""
    rows_read: int = 0
    """Rows the latest resync read: a catch-up's changed rows and deletions, or every page."""
    seconds: float | None = None
    """How long the latest resync took (None while a snapshot loads)."""

    def as_dict(self) -> dict[str, object]:
        return {
            "state": self.state,
            "mode": self.mode,
            "loaded": self.loaded,
            "expected": self.expected,
            "rows_read": self.rows_read,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
        }


class Coherence:
    """The engine's half that listens: doorbells, watermark, resync, snapshot, blindness.
    It shares the engine's cache and store; a store failure is reported through
    `store_failed` (the engine's breaker decides what it means)."""

    def __init__(
        self,
        store: BindingStore,
        cache: BindingCache,
        metrics: AffinityMetrics,
        settings: EngineSettings,
        store_failed: Callable[[StoreUnavailable], None],
        clock: Clock,
        wall_clock: Clock,
        db_clock_offset: Callable[[], float],
    ) -> None:
        self._store = store
        self._cache = cache
        self._m = metrics
        self._s = settings
        self._store_failed = store_failed
        self._clock = clock
        self._wall_clock = wall_clock
        self._db_clock_offset = db_clock_offset
        self._bell_from: int | None = None
        """The version the pending doorbell read starts after (None: no doorbell pending)."""
        self._bell_lags: list[tuple[Pair, int, float]] = []
        """(pair, version, sent_at) the pending doorbells claim, for the lag histogram."""
        self._bell_task: asyncio.Task[None] | None = None
        self._proved = 0
        """The listener's latest proof: every change up to it was notified to this node (it
        becomes the watermark once the doorbells rung before it are answered)."""
        self.listener_up = False
        self._blind_since: float | None = clock()
        self.stale_before = -math.inf
        """Entries the database confirmed before this are re-read before use (while blind, or
        while a reload has not confirmed them yet). The engine reads it on every hit."""
        self._stale_floor = -math.inf
        """The start of a reload over a non-empty cache, until it completes."""
        self._watermark = 0
        """Every change up to this version reached the cache (proved by the listener)."""
        self._complete = False
        """The cache reflects the table (a snapshot completed since start): a catch-up from
        the watermark is enough after a reconnect."""
        self._server_started: float | None = None
        self._loader: asyncio.Task[None] | None = None
        self._reload_again = False
        """A doorbell too large to read came while a load ran: load once more after it."""
        self._status = SyncStatus()
        self._warn = RateLimitedLog(log)
        self._notified = {op: metrics.notifications.labels(op).inc for op in NOTIFY_OPS}
        """Per-op counters, bound once: a busy fleet notifies a thousand times a second."""

    @property
    def status(self) -> SyncStatus:
        return self._status

    @property
    def watermark(self) -> int:
        return self._watermark

    @property
    def doorbells_pending(self) -> bool:
        """A doorbell's read is waiting or in flight."""
        return self._bell_task is not None or self._bell_from is not None

    async def stop(self) -> None:
        await self._stop_loader()
        await self._stop_doorbells()

    # -- the listener's state ----------------------------------------------------------------

    def listener_changed(self, up: bool) -> None:
        """Connected (and synced): entries are trusted again, up to a reload's floor. Lost:
        the blind clock starts."""
        self.listener_up = up
        if up:
            self._blind_since = None
            self.stale_before = self._stale_floor
        elif self._blind_since is None:
            self._blind_since = self._clock()

    def update_blindness(self, now: float) -> None:
        since = self._blind_since
        if since is not None and now - since > self._s.blind_grace_s:
            self.stale_before = max(now - self._s.blind_max_age_s, self._stale_floor)
        else:
            self.stale_before = self._stale_floor

    # -- doorbells ---------------------------------------------------------------------------

    def doorbell(self, event: BindingEvent | None) -> None:
        """A notification on the binding channel (None when unparseable): something changed.
        Nothing in it is applied; the rows read after it are (see `_answer_doorbells`)."""
        if event is None:
            self._m.notifications_rejected.labels("malformed").inc()
            return
        self._notified[event.op]()
        start = read_start(self._watermark, self._cache.max_version, event.version)
        pending = self._bell_from
        self._bell_from = start if pending is None else min(pending, start)
        if len(self._bell_lags) < 10_000:
            self._bell_lags.append((event.pair, event.version, event.sent_at))
        # A reader that has returned but whose done callback has not run yet reads no more:
        # waiting on it would leave this doorbell pending for good (and the watermark with it).
        if self._bell_task is None or self._bell_task.done():
            self._bell_task = asyncio.create_task(
                self._answer_doorbells(), name="affinity-doorbell"
            )
            self._bell_task.add_done_callback(self._doorbells_ended)

    def _doorbells_ended(self, task: asyncio.Task[None]) -> None:
        if self._bell_task is task:
            self._bell_task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("doorbell reader failed", exc_info=task.exception())

    async def _answer_doorbells(self) -> None:
        """One read for every doorbell rung before it starts: the rows changed after the
        lowest start they asked for, and the deletions logged after it. Doorbells rung during
        a read make one more read after it; a failed read is retried (with backoff) from the
        same start, so no change is lost to a database hiccup."""
        pause = self._s.doorbell_retry_s
        while self._bell_from is not None:
            if self._s.doorbell_batch_s > 0:
                await asyncio.sleep(self._s.doorbell_batch_s)
            start, self._bell_from = self._bell_from, None
            lags, self._bell_lags = self._bell_lags, []
            proved = self._proved
            stamp, asked_at = self._cache.stamp(), self._clock()
            try:
                changes = await self._store.changes_since(start, self._s.doorbell_max_rows)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                self._bell_from = start if self._bell_from is None else min(self._bell_from, start)
                self._bell_lags = lags + self._bell_lags
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            pause = self._s.doorbell_retry_s
            if changes is None:
                self._doorbell_overflow(start)
                continue
            self._cache.load(changes.rows, stamp, asked_at)
            for pair, version in changes.deleted:
                self._cache.apply_delete(pair, version)
            self._observe_lags(lags, changes)
            # Every doorbell rung before `proved` was reported is answered once no doorbell
            # waits: then the whole proof holds for the cache.
            if self._bell_from is None:
                proved = self._proved
            self._watermark = max(self._watermark, proved)

    def _doorbell_overflow(self, start: int) -> None:
        """More changed after `start` than a catch-up should read (or the deletion log no
        longer reaches back): reload in pages. A reload running already has read some pairs
        before these changes: it is followed by one more (without it, the changes to those
        pairs would be lost once the listener's proof moved the watermark past them)."""
        if self._loader is not None and not self._loader.done():
            self._reload_again = True
            return
        self._warn.warning(
            "doorbell-overflow", "too much changed after version %d: full snapshot", start
        )
        # A new generation, as a resync starts one: the reload then prunes the entries it
        # does not confirm (rows deleted in the gap, or emptied by a restore).
        self._cache.begin_resync()
        self._start_reload(self._clock())

    def _observe_lags(self, lags: list[tuple[Pair, int, float]], changes: Changes) -> None:
        """Commit to applied, for the doorbells whose change this read brought (a forged one
        names no row that the read returns, so it is not counted)."""
        if not lags:
            return
        read = {((r[0], r[1]), r[3]) for r in changes.rows}
        read.update(changes.deleted)
        now = self._wall_clock() + self._db_clock_offset()
        for pair, version, sent_at in lags:
            if (pair, version) in read:
                lag = plausible_lag(sent_at, now)
                if lag is not None:
                    self._m.notify_lag.observe(lag)

    def advance_watermark(self, version: int) -> None:
        """The listener proved that every change up to `version` was notified to this node;
        with no doorbell waiting, every one of them has been read already."""
        if version > self._proved:
            self._proved = version
        if self._bell_task is None and self._bell_from is None and version > self._watermark:
            self._watermark = version

    async def _stop_doorbells(self) -> None:
        """A resync reads from the watermark itself: doorbells rung before it are answered by
        it (their changes committed before it began)."""
        task, self._bell_task = self._bell_task, None
        self._bell_from = None
        self._bell_lags = []
        await stop_all(task)

    # -- resync ------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Called by the listener after each LISTEN, before it reports itself up.

        With a complete cache, catch up: the rows changed after the watermark and the logged
        deletions after it (one snapshot, a few statements). Otherwise, or when the store says
        the gap is too old or too large, start a full snapshot in pages in the background and
        return: requests are served meanwhile.
        """
        await self._stop_loader()
        await self._stop_doorbells()
        started = self._clock()
        self._cache.begin_resync()
        version_now = await self._store.version_now()
        server_started = await self._store.server_started_at()
        self._cache.seen(version_now)
        if version_now < self._watermark or server_started != self._server_started:
            # Restarted, restored or failed over (an asynchronous standby may lack commits this
            # node was told of, and hand their versions out again): the watermark proves
            # nothing any more.
            if self._server_started is not None:
                log.warning("the database restarted or went back in time: full snapshot")
            self._complete = False
            self._watermark = self._proved = 0
        self._server_started = server_started
        if self._complete:
            stamp, asked_at = self._cache.stamp(), self._clock()
            changes = await self._store.changes_since(self._watermark, self._s.catchup_max_rows)
            if changes is not None:
                self._cache.load(changes.rows, stamp, asked_at)
                for pair, version in changes.deleted:
                    self._cache.apply_delete(pair, version)
                read = len(changes.rows) + len(changes.deleted)
                self._status = SyncStatus(
                    "done", "incremental", self._status.loaded, self._status.expected, read,
                    self._clock() - started,
                )  # fmt: skip
                self._m.cache_resyncs.inc()
                self._m.resync_rows.labels("incremental").inc(read)
                return
        self._start_reload(started)

    def _start_reload(self, started: float) -> None:
        """Every live binding, in pages, in the background: requests are served meanwhile."""
        self._complete = False
        self._reload_again = False
        # Entries from before a reload may be stale (what was missed is unknown): re-read each
        # before use until the reload has confirmed it.
        self._stale_floor = math.nextafter(started, -math.inf) if len(self._cache) else -math.inf
        self.stale_before = max(self.stale_before, self._stale_floor)
        self._status = SyncStatus("loading", "full")
        self._loader = asyncio.create_task(self._load_snapshot(started), name="affinity-snapshot")
        self._loader.add_done_callback(self._load_ended)

    def _load_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Left incomplete: the next resync (a reconnect) starts it again.
            log.error("binding snapshot failed", exc_info=task.exception())

    async def _stop_loader(self) -> None:
        loader, self._loader = self._loader, None
        await stop_all(loader)

    async def _read_page(self, after: Pair | None) -> tuple[SnapshotPage, int, float]:
        """One page with the stamp and time taken before it; retried until it answers (a
        reconnect cancels the whole load)."""
        pause = self._s.snapshot_retry_s
        while True:
            stamp, asked_at = self._cache.stamp(), self._clock()
            try:
                rows = await self._store.snapshot_page(after, self._s.snapshot_page_rows)
            except StoreUnavailable as exc:
                self._m.db_errors.labels(exc.operation).inc()
                self._warn.warning("snapshot", "binding snapshot: %s (retrying)", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            return rows, stamp, asked_at

    async def _load_snapshot(self, started: float, chunk: int = 5_000) -> None:
        """Every live binding, page after page (the next page is read while one is stored),
        then the entries no page confirmed are dropped (their rows are gone)."""
        status, cache, size = self._status, self._cache, self._s.snapshot_page_rows
        held_before = len(cache)  # 0 at start: nothing older to prune afterwards
        with contextlib.suppress(StoreUnavailable):
            status.expected = await self._store.estimate_bindings()
        cache.reserve(status.expected)
        pending = asyncio.create_task(self._read_page(None))
        try:
            while True:
                page, stamp, asked_at = await pending
                status.rows_read += page.rows
                more = page.rows >= size > 0 and page.last is not None
                if more:
                    pending = asyncio.create_task(self._read_page(page.last))
                for i in range(0, max(len(page.models), 1), chunk):  # others run in between
                    status.loaded += cache.load_page(page, stamp, asked_at, i, i + chunk)
                    await asyncio.sleep(0)
                if not more:
                    break
            for start in range(0, cache.slots if held_before else 0, 50_000):
                cache.prune_unconfirmed(start, start + 50_000)
                await asyncio.sleep(0)
        finally:
            if not pending.done():
                pending.cancel()
        self._complete = True
        self._stale_floor = -math.inf
        self.update_blindness(self._clock())
        status.state = "done"
        status.seconds = self._clock() - started
        self._m.cache_resyncs.inc()
        self._m.resync_rows.labels("full").inc(status.rows_read)
        log.info(
            "binding snapshot loaded: %d bindings from %d rows in %.2fs",
            status.loaded,
            status.rows_read,
            status.seconds,
        )
        if self._reload_again:
            self._warn.warning(
                "doorbell-overflow", "a doorbell overflowed during the snapshot: loading again"
            )
            self._cache.begin_resync()
            self._start_reload(self._clock())
