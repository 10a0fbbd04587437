"""The affinity engine: which backend serves an (API key, model) pair, on every node alike.

A hit is one dict lookup: no await, no database, no lock. Everything else (miss, expiry,
rebind) goes to the store, and concurrent callers for the same pair on this node share one
trip there (single flight), so a burst of N requests for a new pair costs one transaction
per node, and across nodes the store's advisory lock makes one of them the creator.

Affinity is a hint: when the store fails, the request is still served by the fallback
chooser (outcome `degraded`), and after a connection-level failure the store is not asked
again for `db_retry_after_s`, so an outage costs no per-request timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.ports import (
    BindingEvent,
    BindingStore,
    Clock,
    Pair,
    StoredBinding,
    StoreUnavailable,
)
from affinity_node.vocabulary import MissOutcome, Outcome, RebindReason

log = logging.getLogger(__name__)

Chooser = Callable[[Sequence[str]], str]
"""The fallback strategy: picks one of the candidate backends."""


@dataclass(frozen=True, slots=True)
class EngineSettings:
    ttl_seconds: float = 1800.0
    refresh_flush_interval_s: float = 1.0
    cleanup_interval_s: float = 60.0
    cleanup_batch: int = 1000
    db_retry_after_s: float = 1.0
    max_degraded_pins: int = 10_000


@dataclass(frozen=True, slots=True)
class Resolution:
    backend: str
    outcome: Outcome


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
        self._s = settings or EngineSettings()
        self._db_clock_offset = db_clock_offset
        self._inflight: dict[Pair, asyncio.Task[Resolution]] = {}
        self._refresh_queue: dict[Pair, str] = {}
        self._degraded_pins: OrderedDict[Pair, str] = OrderedDict()
        self._db_retry_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._hit_counters: dict[str, Callable[[], None]] = {}
        self._warn = RateLimitedLog(log)
        metrics.cache_entries.set_function(lambda: len(self._cache))
        metrics.db_up.set(0)

    @property
    def cache(self) -> BindingCache:
        return self._cache

    @property
    def settings(self) -> EngineSettings:
        return self._s

    # -- lifecycle ---------------------------------------------------------------------------

    def start_background(self) -> None:
        self._tasks.append(asyncio.create_task(self._refresh_loop(), name="affinity-refresh"))
        self._tasks.append(asyncio.create_task(self._cleanup_loop(), name="affinity-cleanup"))

    async def stop(self) -> None:
        """Stops the loops and writes the refreshes still queued."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.flush_refreshes()

    # -- the request path --------------------------------------------------------------------

    async def resolve(
        self, api_key_id: UUID, model: str, candidates: Sequence[str], choose: Chooser
    ) -> Resolution:
        """The backend for this pair among `candidates` (the model's healthy backends)."""
        pair = (api_key_id, model)
        entry = self._cache.get(pair)
        if entry is not None and entry.deadline > self._clock() and entry.backend in candidates:
            counter = self._hit_counters.get(model)
            if counter is None:
                counter = self._hit_counters[model] = self._m.cache_hits.labels(model).inc
            counter()
            return Resolution(entry.backend, "hit")
        if not candidates:
            raise NoCandidates(model)
        task = self._inflight.get(pair)
        leader = task is None
        if task is None:
            task = asyncio.create_task(self._resolve_slow(pair, tuple(candidates), choose))
            self._inflight[pair] = task
            task.add_done_callback(lambda _t: self._inflight.pop(pair, None))
        result = await asyncio.shield(task)
        if not leader:
            result = self._as_follower(pair, result, candidates, choose)
        return result

    def _as_follower(
        self, pair: Pair, result: Resolution, candidates: Sequence[str], choose: Chooser
    ) -> Resolution:
        """A caller that waited on another's trip: one creation per row, counted once."""
        model = pair[1]
        if result.backend not in candidates:  # its view of health differs: serve, don't bind
            return Resolution(choose(candidates), "degraded")
        if result.outcome == "created":
            self._m.cache_misses.labels(model, "found_after_lock").inc()
            return Resolution(result.backend, "found_after_lock")
        if result.outcome in ("found_in_db", "found_after_lock", "degraded"):
            self._m.cache_misses.labels(model, result.outcome).inc()
        return result

    async def _resolve_slow(
        self, pair: Pair, candidates: tuple[str, ...], choose: Chooser
    ) -> Resolution:
        entry = self._cache.get(pair)
        if entry is not None and entry.deadline > self._clock():
            # Cached but the bound backend is not a candidate (unhealthy or removed): move it.
            return await self._rebind(pair, entry.backend, candidates, choose, "unhealthy")
        return await self._miss(pair, candidates, choose)

    async def _miss(self, pair: Pair, candidates: tuple[str, ...], choose: Chooser) -> Resolution:
        if self._store_paused():
            return self._degraded(pair, candidates, choose)
        epoch = self._cache.epoch
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
            self._store_failed(exc)
            return self._degraded(pair, candidates, choose)
        self._store_ok()
        self._fill(pair, stored, epoch, asked_at)
        if stored.backend not in candidates:
            return await self._rebind(pair, stored.backend, candidates, choose, "unhealthy")
        self._m.cache_misses.labels(pair[1], outcome).inc()
        return Resolution(stored.backend, outcome)

    async def _rebind(
        self,
        pair: Pair,
        old: str,
        candidates: tuple[str, ...],
        choose: Chooser,
        reason: RebindReason,
    ) -> Resolution:
        if self._store_paused():
            return self._degraded(pair, candidates, choose)
        epoch = self._cache.epoch
        try:
            for _ in range(3):
                new = choose(candidates)
                asked_at = self._clock()
                moved = await self._store.rebind(pair, old, new, self._s.ttl_seconds)
                if moved is not None:
                    self._store_ok()
                    self._fill(pair, moved, epoch, asked_at)
                    self._m.rebinds.labels(pair[1], reason).inc()
                    return Resolution(moved.backend, "rebind")
                # Someone moved or deleted it first: take theirs if it can serve.
                asked_at = self._clock()
                current = await self._store.read(pair)
                if current is None:
                    self._cache.evict(pair, old)
                    return await self._miss(pair, candidates, choose)
                self._fill(pair, current, epoch, asked_at)
                if current.backend in candidates:
                    return Resolution(current.backend, "rebind")
                old = current.backend
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return self._degraded(pair, candidates, choose)
        return self._degraded(pair, candidates, choose)

    def _fill(self, pair: Pair, stored: StoredBinding, epoch: int, asked_at: float) -> None:
        self._cache.fill(pair, stored.backend, stored.version, stored.ttl, epoch, asked_at)

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

    def _store_paused(self) -> bool:
        return self._clock() < self._db_retry_at

    def _store_failed(self, exc: StoreUnavailable) -> None:
        self._m.db_errors.labels(exc.operation).inc()
        if exc.down:
            self._db_retry_at = self._clock() + self._s.db_retry_after_s
            self._m.db_up.set(0)
        self._warn.warning(exc.operation, "binding store: %s", exc)

    def _store_ok(self) -> None:
        if self._db_retry_at:
            self._db_retry_at = 0.0
            self._degraded_pins.clear()
        self._m.db_up.set(1)

    def listener_state(self, up: bool) -> None:
        """The listener connected (and synced) or lost its connection."""
        self._m.listener_up.set(1 if up else 0)
        if up:
            self._store_ok()

    # -- after the response ------------------------------------------------------------------

    def served(self, api_key_id: UUID, model: str, backend: str) -> None:
        """A request bound to `backend` succeeded there: extend the binding if half-spent."""
        pair = (api_key_id, model)
        entry = self._cache.get(pair)
        if entry is None or entry.backend != backend:
            return
        if entry.deadline - self._clock() < self._s.ttl_seconds / 2:
            self._refresh_queue[pair] = backend

    def failed_over(self, api_key_id: UUID, model: str, bound: str, served_by: str) -> None:
        """The bound backend failed and `served_by` succeeded: move the binding (CAS)."""
        pair = (api_key_id, model)
        task = asyncio.create_task(self._failover(pair, bound, served_by))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _failover(self, pair: Pair, bound: str, served_by: str) -> None:
        if self._store_paused():
            return
        epoch = self._cache.epoch
        asked_at = self._clock()
        try:
            moved = await self._store.rebind(pair, bound, served_by, self._s.ttl_seconds)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return
        self._store_ok()
        if moved is not None:
            self._fill(pair, moved, epoch, asked_at)
            self._m.rebinds.labels(pair[1], "failover").inc()

    async def flush_refreshes(self) -> int:
        """One statement for everything queued since the last flush."""
        if not self._refresh_queue or self._store_paused():
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
        """Delete expired rows in batches, if this node holds the cleaner lock."""
        total = 0
        while True:
            try:
                deleted = await self._store.delete_expired(self._s.cleanup_batch)
            except StoreUnavailable as exc:
                self._store_failed(exc)
                return total
            if deleted is None:
                return total
            total += deleted
            if deleted < self._s.cleanup_batch:
                return total

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.cleanup_interval_s)
            await self.cleanup_expired()

    # -- coherence ---------------------------------------------------------------------------

    def apply_event(self, event: BindingEvent | None) -> None:
        """A notification from the binding table, in commit order."""
        if event is None:
            return
        self._m.notifications.labels(event.op).inc()
        lag = max(self._wall_clock() + self._db_clock_offset() - event.sent_at, 0.0)
        self._m.notify_lag.observe(lag)
        if event.op == "delete":
            self._cache.apply_delete(event.pair, event.version)
        else:
            self._cache.apply_change(event.pair, event.backend, event.version, event.ttl - lag)

    async def resync(self) -> None:
        """Reload the cache from a snapshot; called by the listener after each LISTEN."""
        self._cache.begin_resync()
        asked_at = self._clock()
        try:
            rows = await self._store.snapshot(self._cache.max_entries)
        except BaseException:
            self._cache.abort_resync()
            raise
        self._cache.finish_resync(rows, asked_at)
        self._m.cache_resyncs.inc()
