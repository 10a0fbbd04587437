"""The affinity engine: which backend serves an (API key, model) pair, on every node alike.

A hit is one dict lookup: no await, no database, no lock. Everything else (miss, expiry,
rebind) goes to the store, and concurrent callers for the same pair on this node share one
trip there (single flight), so a burst of N requests for a new pair costs one transaction
per node, and across nodes the store's advisory lock makes one of them the creator.

Affinity is a hint: when the store fails, the request is still served by the fallback
chooser (outcome `degraded`), and after a failure that looks like an outage a breaker keeps
every other request from asking (routing/breaker.py), so an outage costs no per-request
timeouts. A notification is a doorbell, never believed by itself (routing/trust.py): it makes
the node read what changed after its watermark from the table, one coalesced read for a burst,
and only rows read from the table move, evict or add a cached pair. Staleness is
bounded: expired entries are swept, and while the listener is down, entries the database has
not confirmed for `blind_max_age_s` are re-read before they are used.

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
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.breaker import StoreBreaker
from affinity_node.routing.cache import BindingCache, Hit
from affinity_node.routing.ports import (
    NO_MEMBERS,
    BindingEvent,
    BindingStore,
    Changes,
    Clock,
    Members,
    Pair,
    SnapshotPage,
    StoredBinding,
    StoreUnavailable,
)
from affinity_node.routing.trust import plausible_lag, read_start
from affinity_node.vocabulary import (
    EVICT_REASONS,
    NOTIFY_OPS,
    FanoutDirection,
    FanoutReason,
    MissOutcome,
    MoveReason,
    Outcome,
    RebindReason,
    ResyncMode,
    SnapshotState,
)

log = logging.getLogger(__name__)

Chooser = Callable[[Sequence[str]], str]
"""The fallback strategy: picks one of the candidate backends."""
Successor = Callable[[Pair, Sequence[str]], str]
"""Where a pair goes when its backend can no longer serve it (the same answer on every node,
so a retry and the rebind after it agree)."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    ttl_seconds: float = 1800.0
    refresh_flush_interval_s: float = 1.0
    cleanup_interval_s: float = 60.0
    cleanup_batch: int = 1000
    db_retry_after_s: float = 1.0
    """The breaker's first pause after an outage-like failure (doubles up to 10 s)."""
    max_degraded_pins: int = 10_000
    sweep_interval_s: float = 0.5
    """How often expired entries leave the cache (and the blind clock is checked)."""
    blind_grace_s: float = 3.0
    """A listener down longer than this makes cached entries suspect ..."""
    blind_max_age_s: float = 5.0
    """... and an entry not confirmed by the database for this long is re-read before use."""
    snapshot_page_rows: int = 50_000
    """Rows per statement of a full snapshot (each page is one short, bounded statement: ~50 ms
    for 50,000 rows on a laptop-class server)."""
    snapshot_retry_s: float = 0.2
    """First pause before a failed page is read again (doubles up to 5 s; resumes, never
    restarts)."""
    catchup_max_rows: int = 100_000
    """A catch-up that would read more rows than this reloads in pages instead."""
    deletion_log_retention_s: float = 900.0
    """How long the cleanup leader keeps deletion-log entries: a node whose listener was away
    longer reloads in full."""
    doorbell_batch_s: float = 0.002
    """A doorbell waits this long before its read, so a burst of notifications shares one."""
    doorbell_max_rows: int = 20_000
    """A doorbell's read that would return more rows than this reloads in pages instead."""
    doorbell_retry_s: float = 0.05
    """First pause after a doorbell's read failed (doubles up to 2 s; it is read again)."""


@dataclass(slots=True)
class Resolution:
    """What `resolve` answers; treat it as read-only. Not a frozen dataclass: one is built per
    hit, and a frozen one's __init__ (object.__setattr__ per field) cost ~0.7 us of a ~2 us
    hit."""

    backend: str
    """The set's first member (or the backend to use when affinity cannot say)."""
    outcome: Outcome
    fanout: Members = NO_MEMBERS
    """The set's other members; a request may go to any healthy one."""
    version: int = 0
    """The binding's version (what a set change must find to succeed)."""


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


class NoCandidates(LookupError):
    """No healthy backend serves the model: nothing to route to, with or without affinity."""


class AffinityEngine:
    def __init__(
        self,
        store: BindingStore,
        cache: BindingCache,
        metrics: AffinityMetrics,
        settings: EngineSettings | None = None,
        db_clock_offset: Callable[[], float] = lambda: 0.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        """`clock` times local deadlines and pauses (the cache must use the same one);
        `wall_clock` plus `db_clock_offset` dates notifications against the database clock."""
        self._store = store
        self._cache = cache
        self._clock = clock
        self._wall_clock = wall_clock
        self._m = metrics
        self._s = settings = settings or EngineSettings()
        self._db_clock_offset = db_clock_offset
        self._inflight: dict[Pair, asyncio.Task[Resolution]] = {}
        self._refresh_queue: dict[Pair, str] = {}
        self._degraded_pins: OrderedDict[Pair, str] = OrderedDict()
        self._breaker = StoreBreaker(
            self._trial, self._breaker_changed, clock, pause_s=settings.db_retry_after_s
        )
        self._bell_from: int | None = None
        """The version the pending doorbell read starts after (None: no doorbell pending)."""
        self._bell_lags: list[tuple[Pair, int, float]] = []
        """(pair, version, sent_at) the pending doorbells claim, for the lag histogram."""
        self._bell_task: asyncio.Task[None] | None = None
        self._proved = 0
        """The listener's latest proof: every change up to it was notified to this node (it
        becomes the watermark once the doorbells rung before it are answered)."""
        self._listener_up = False
        self._blind_since: float | None = clock()
        self._stale_before = -math.inf
        """Entries the database confirmed before this are re-read before use (while blind, or
        while a reload has not confirmed them yet)."""
        self._stale_floor = -math.inf
        """The start of a reload over a non-empty cache, until it completes."""
        self._watermark = 0
        """Every change up to this version reached the cache (proved by the listener)."""
        self._complete = False
        """The cache reflects the table (a snapshot completed since start): a catch-up from
        the watermark is enough after a reconnect."""
        self._server_started: float | None = None
        self._loader: asyncio.Task[None] | None = None
        self._status = SyncStatus()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._hit_counters: dict[str, Callable[[], None]] = {}
        self._warn = RateLimitedLog(log)
        metrics.cache_entries.set_function(lambda: len(self._cache))
        metrics.db_up.set(0)
        self._notified = {op: metrics.notifications.labels(op).inc for op in NOTIFY_OPS}
        """Per-op counters, bound once: a busy fleet notifies a thousand times a second."""
        evictions = {r: metrics.cache_evictions.labels(r).inc for r in EVICT_REASONS}
        cache.on_evict = lambda reason, n: evictions[reason](n)

    @property
    def cache(self) -> BindingCache:
        return self._cache

    @property
    def settings(self) -> EngineSettings:
        return self._s

    @property
    def sync_status(self) -> SyncStatus:
        return self._status

    @property
    def watermark(self) -> int:
        return self._watermark

    @property
    def doorbells_pending(self) -> bool:
        """A doorbell's read is waiting or in flight."""
        return self._bell_task is not None or self._bell_from is not None

    # -- lifecycle ---------------------------------------------------------------------------

    def start_background(self) -> None:
        for loop, name in (
            (self._refresh_loop, "affinity-refresh"),
            (self._cleanup_loop, "affinity-cleanup"),
            (self._sweep_loop, "affinity-sweep"),
        ):
            self._tasks.append(asyncio.create_task(loop(), name=name))

    async def stop(self) -> None:
        """Stops the loops and writes the refreshes still queued."""
        await self._stop_loader()
        await self._stop_doorbells()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._breaker.stop()
        await self.flush_refreshes()

    # -- the request path --------------------------------------------------------------------

    async def resolve(
        self,
        api_key_id: UUID,
        model: str,
        candidates: Sequence[str],
        choose: Chooser,
        successor: Successor | None = None,
    ) -> Resolution:
        """The backend for this pair among `candidates` (the model's healthy backends):
        `choose` places a new binding, `successor` moves one whose backend left the candidates
        (default: `choose`)."""
        pair = (api_key_id, model)
        hit = self._cache.lookup(pair)
        if (
            hit is not None
            and hit[2] > self._clock()
            and hit[3] > self._stale_before
            and hit[0] in candidates
        ):
            return self._hit(model, hit)
        if not candidates:
            raise NoCandidates(model)
        task = self._inflight.get(pair)
        leader = task is None
        if task is None:
            task = asyncio.create_task(
                self._resolve_slow(pair, tuple(candidates), choose, successor)
            )
            self._inflight[pair] = task
            task.add_done_callback(lambda _t: self._inflight.pop(pair, None))
        result = await asyncio.shield(task)
        if not leader:
            result = self._as_follower(pair, result, candidates, choose)
        return result

    def _hit(self, model: str, hit: Hit) -> Resolution:
        counter = self._hit_counters.get(model)
        if counter is None:
            counter = self._hit_counters[model] = self._m.cache_hits.labels(model).inc
        counter()
        return Resolution(hit[0], "hit", hit[4], hit[1])

    def _as_follower(
        self, pair: Pair, result: Resolution, candidates: Sequence[str], choose: Chooser
    ) -> Resolution:
        """A caller that waited on another's trip: one creation per row, counted once."""
        model = pair[1]
        if result.backend not in candidates:  # its view of health differs: serve, don't bind
            return Resolution(choose(candidates), "degraded")
        if result.outcome == "created":
            self._m.cache_misses.labels(model, "found_after_lock").inc()
            return Resolution(result.backend, "found_after_lock", result.fanout, result.version)
        if result.outcome in ("found_in_db", "found_after_lock", "degraded"):
            self._m.cache_misses.labels(model, result.outcome).inc()
        elif result.outcome == "hit":
            self._m.cache_hits.labels(model).inc()
        return result

    async def _resolve_slow(
        self,
        pair: Pair,
        candidates: tuple[str, ...],
        choose: Chooser,
        successor: Successor | None = None,
    ) -> Resolution:
        entry = self._cache.lookup(pair)
        if entry is not None and entry[2] > self._clock():
            backend, _version, _deadline, checked, fanout = entry
            if backend in candidates:
                if checked > self._stale_before:
                    # A notification landed since the caller looked: it is a hit now.
                    return self._hit(pair[1], entry)
                # suspect: read it again
                return await self._miss(pair, candidates, choose, successor)
            # Cached but the bound backend is not a candidate (unhealthy or removed): move it,
            # to a member of its set when one can serve (that cache is warm already).
            return await self._rebind(
                pair, backend, candidates, choose, "unhealthy", fanout, successor
            )
        return await self._miss(pair, candidates, choose, successor)

    async def _miss(
        self,
        pair: Pair,
        candidates: tuple[str, ...],
        choose: Chooser,
        successor: Successor | None = None,
    ) -> Resolution:
        if not self._breaker.allows():
            return self._degraded(pair, candidates, choose)
        stamp = self._cache.stamp()
        asked_at = self._clock()
        try:
            stored = await self._store.read(pair)
            outcome: MissOutcome = "found_in_db"
            if stored is None:
                asked_at = self._clock()
                created = await self._store.create_if_absent(
                    pair, lambda: choose(candidates), self._s.ttl_seconds
                )
                self._m.lock_wait.observe(created.lock_wait)
                stored = created.binding
                outcome = "created" if created.created else "found_after_lock"
        except StoreUnavailable as exc:
            if exc.lock_wait is not None:
                self._m.lock_wait.observe(exc.lock_wait)
            self._store_failed(exc)
            return self._degraded(pair, candidates, choose)
        self._store_ok()
        self._fill(pair, stored, stamp, asked_at)
        if stored.backend not in candidates:
            return await self._rebind(
                pair, stored.backend, candidates, choose, "unhealthy", stored.fanout, successor
            )
        self._m.cache_misses.labels(pair[1], outcome).inc()
        return Resolution(stored.backend, outcome, stored.fanout, stored.version)

    async def _rebind(
        self,
        pair: Pair,
        old: str,
        candidates: tuple[str, ...],
        choose: Chooser,
        reason: RebindReason,
        fanout: Members = NO_MEMBERS,
        successor: Successor | None = None,
    ) -> Resolution:
        if not self._breaker.allows():
            return self._degraded(pair, candidates, choose)
        stamp = self._cache.stamp()
        try:
            for _ in range(3):
                new = next((m for m in fanout if m in candidates), None) or (
                    choose(candidates) if successor is None else successor(pair, candidates)
                )
                asked_at = self._clock()
                moved = await self._store.rebind(pair, old, new, self._s.ttl_seconds)
                if moved is not None:
                    self._store_ok()
                    self._fill(pair, moved, stamp, asked_at)
                    self._m.rebinds.labels(pair[1], reason).inc()
                    return Resolution(moved.backend, "rebind", moved.fanout, moved.version)
                # Someone moved or deleted it first: take theirs if it can serve.
                asked_at = self._clock()
                current = await self._store.read(pair)
                if current is None:
                    self._cache.evict(pair, old)
                    return await self._miss(pair, candidates, choose, successor)
                self._fill(pair, current, stamp, asked_at)
                if current.backend in candidates:
                    return Resolution(current.backend, "rebind", current.fanout, current.version)
                old, fanout = current.backend, current.fanout
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return self._degraded(pair, candidates, choose)
        return self._degraded(pair, candidates, choose)

    def _fill(self, pair: Pair, stored: StoredBinding, stamp: int, asked_at: float) -> None:
        self._cache.fill(
            pair, stored.backend, stored.version, stored.ttl, stamp, asked_at, stored.fanout
        )

    async def move(self, pair: Pair, old: str, new: str, reason: MoveReason) -> bool:
        """The fleet's mover moves a binding (compare-and-set from `old`); False when it no
        longer points there or the store is out of reach."""
        if not self._breaker.allows():
            return False
        stamp = self._cache.stamp()
        asked_at = self._clock()
        try:
            moved = await self._store.rebind(pair, old, new, self._s.ttl_seconds)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return False
        self._store_ok()
        if moved is None:
            return False
        self._fill(pair, moved, stamp, asked_at)
        self._m.rebinds.labels(pair[1], reason).inc()
        self._m.moves.labels(reason).inc()
        return True

    async def set_members(
        self,
        pair: Pair,
        version: int,
        fanout: Members,
        direction: FanoutDirection,
        reason: FanoutReason,
    ) -> bool:
        """Grow or shrink a pair's set (compare-and-set on `version`); False when the store is
        out of reach or another node changed the set first."""
        if not self._breaker.allows():
            return False
        stamp = self._cache.stamp()
        asked_at = self._clock()
        try:
            changed = await self._store.set_members(pair, version, fanout)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return False
        self._store_ok()
        if changed is None:
            return False
        self._fill(pair, changed, stamp, asked_at)
        self._m.fanout_changes.labels(pair[1], direction, reason).inc()
        return True

    def _degraded(self, pair: Pair, candidates: tuple[str, ...], choose: Chooser) -> Resolution:
        """Serve without the store; keep the pair on one backend of this node meanwhile."""
        backend = self._degraded_pins.get(pair)
        if backend is None or backend not in candidates:
            backend = choose(candidates)
            self._degraded_pins[pair] = backend
            if len(self._degraded_pins) > self._s.max_degraded_pins:
                self._degraded_pins.popitem(last=False)
        self._m.cache_misses.labels(pair[1], "degraded").inc()
        return Resolution(backend, "degraded")

    # -- store health ------------------------------------------------------------------------

    @property
    def store_available(self) -> bool:
        """False while the breaker is open: the store is not asked."""
        return self._breaker.closed

    async def _trial(self) -> None:
        await self._store.ping()

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self._m.db_errors.labels(exc.operation).inc()
        if exc.down:
            self._breaker.failed()
        self._warn.warning(exc.operation, "binding store: %s", exc)

    def _store_ok(self) -> None:
        self._breaker.succeeded()

    def _breaker_changed(self, closed: bool) -> None:
        if closed:
            self._degraded_pins.clear()
        self._publish_db_up()

    def _publish_db_up(self) -> None:
        """The database is up for this node when its listener is connected and its store
        answers: a lost listener shows at once, even while every request is a hit."""
        self._m.db_up.set(1 if self._listener_up and self._breaker.closed else 0)

    def listener_state(self, up: bool) -> None:
        """The listener connected (and synced) or lost its connection."""
        self._m.listener_up.set(1 if up else 0)
        self._listener_up = up
        if up:
            self._blind_since = None
            self._stale_before = self._stale_floor
            self._breaker.succeeded()
        else:
            if self._blind_since is None:
                self._blind_since = self._clock()
            self._breaker.trip()  # whatever the store does next is proven by a trial first
        self._publish_db_up()

    def _update_blindness(self, now: float) -> None:
        since = self._blind_since
        if since is not None and now - since > self._s.blind_grace_s:
            self._stale_before = max(now - self._s.blind_max_age_s, self._stale_floor)
        else:
            self._stale_before = self._stale_floor

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.sweep_interval_s)
            now = self._clock()
            self._cache.sweep(now)
            self._update_blindness(now)

    # -- after the response ------------------------------------------------------------------

    def served(self, api_key_id: UUID, model: str, backend: str) -> None:
        """A request bound to `backend` (any member of the pair's set) succeeded there:
        extend the binding if half-spent."""
        pair = (api_key_id, model)
        entry = self._cache.lookup(pair)
        if entry is None or (entry[0] != backend and backend not in entry[4]):
            return
        if entry[2] - self._clock() < self._s.ttl_seconds / 2:
            self._refresh_queue[pair] = entry[0]

    def failed_over(self, api_key_id: UUID, model: str, bound: str, served_by: str) -> None:
        """The bound backend failed and `served_by` succeeded: move the binding (CAS)."""
        pair = (api_key_id, model)
        task = asyncio.create_task(self._failover(pair, bound, served_by))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _failover(self, pair: Pair, bound: str, served_by: str) -> None:
        if not self._breaker.allows():
            return
        stamp = self._cache.stamp()
        asked_at = self._clock()
        try:
            moved = await self._store.rebind(pair, bound, served_by, self._s.ttl_seconds)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return
        self._store_ok()
        if moved is not None:
            self._fill(pair, moved, stamp, asked_at)
            self._m.rebinds.labels(pair[1], "failover").inc()

    async def flush_refreshes(self) -> int:
        """One statement for everything queued since the last flush."""
        if not self._refresh_queue or not self._breaker.allows():
            return 0
        batch, self._refresh_queue = self._refresh_queue, {}
        items = list(batch.items())
        asked_at = self._clock()
        try:
            rows = await self._store.refresh(items, self._s.ttl_seconds)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return 0
        self._store_ok()
        self._m.refresh_writes.inc()
        # Pairs not returned moved or vanished (a notification says so) or another node was
        # extending them at that instant: their local deadlines stand, and past them the
        # entry is re-read.
        for row in rows:
            self._cache.extend(
                (row.api_key_id, row.model), row.backend, row.version, row.ttl, asked_at
            )
        return len(rows)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.refresh_flush_interval_s)
            await self.flush_refreshes()

    async def cleanup_expired(self) -> int:
        """Delete expired rows in batches (each its own short transaction), then trim the
        deletion log, if this node holds the cleaner lock. Returns the expired rows deleted."""
        total = 0
        while self._breaker.allows():
            try:
                deleted = await self._store.delete_expired(self._s.cleanup_batch)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                return total
            if deleted is None:
                return total
            total += deleted
            if deleted < self._s.cleanup_batch:
                break
        while self._breaker.allows():
            try:
                trimmed = await self._store.trim_deletions(
                    self._s.deletion_log_retention_s, self._s.cleanup_batch
                )
            except StoreUnavailable as exc:
                self._store_failed(exc)
                break
            if trimmed is None or trimmed < self._s.cleanup_batch:
                break
        return total

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.cleanup_interval_s)
            await self.cleanup_expired()

    # -- coherence ---------------------------------------------------------------------------

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
        if self._bell_task is None:
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
        longer reaches back): reload in pages, unless a reload runs already."""
        if self._loader is not None and not self._loader.done():
            return
        self._warn.warning(
            "doorbell-overflow", "too much changed after version %d: full snapshot", start
        )
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
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        # Entries from before a reload may be stale (what was missed is unknown): re-read each
        # before use until the reload has confirmed it.
        self._stale_floor = math.nextafter(started, -math.inf) if len(self._cache) else -math.inf
        self._stale_before = max(self._stale_before, self._stale_floor)
        self._status = SyncStatus("loading", "full")
        self._loader = asyncio.create_task(self._load_snapshot(started), name="affinity-snapshot")
        self._loader.add_done_callback(self._load_ended)

    def _load_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Left incomplete: the next resync (a reconnect) starts it again.
            log.error("binding snapshot failed", exc_info=task.exception())

    async def _stop_loader(self) -> None:
        loader, self._loader = self._loader, None
        if loader is not None and not loader.done():
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader

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
        self._update_blindness(self._clock())
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
