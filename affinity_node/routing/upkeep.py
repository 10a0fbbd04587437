"""Upkeep of the binding table: TTL refreshes after responses, and expired rows.

A request that succeeded on a binding whose remaining TTL is below half queues a refresh; the
queue is written in one statement per flush interval, never while a response waits. Expired
rows are deleted in batches by the node holding the cleaner lock, which also trims the
deletion log that catch-ups read (routing/coherence.py).
"""

from __future__ import annotations

from collections.abc import Callable

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.breaker import StoreBreaker
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.ports import BindingStore, Clock, Pair, StoreUnavailable

SERVED_KEPT = 100_000
"""Pairs whose last success this node remembers (most recent last); beyond, the oldest go."""


class Upkeep:
    """The engine's half that writes after the fact; it asks the store only while the
    engine's breaker allows, and reports failures through `store_failed`."""

    def __init__(
        self,
        store: BindingStore,
        cache: BindingCache,
        metrics: AffinityMetrics,
        settings: EngineSettings,
        breaker: StoreBreaker,
        store_failed: Callable[[StoreUnavailable], None],
        clock: Clock,
    ) -> None:
        self._store = store
        self._cache = cache
        self._m = metrics
        self._s = settings
        self._breaker = breaker
        self._store_failed = store_failed
        self._clock = clock
        self._refresh_queue: dict[Pair, str] = {}
        self._served_at: dict[Pair, float] = {}

    def served(self, pair: Pair, backend: str, deadline: float = 0.0) -> None:
        """A request bound to `backend` (any member of the pair's set) succeeded there:
        extend the binding if half-spent. `deadline`: the binding's as the request's routing
        read it; the cache is read again only when that one says half-spent (a refresh since
        only makes it later), not on every success."""
        now = self._clock()
        half = self._s.ttl_seconds / 2
        due = deadline - now < half
        if due:
            hit = self._cache.lookup(pair)
            if hit is None:
                return
            bound, _version, deadline, _checked, fanout = hit
            if bound != backend and backend not in fanout:
                return
            due = deadline - now < half
        served = self._served_at
        served.pop(pair, None)
        served[pair] = now
        if len(served) > SERVED_KEPT:
            del served[next(iter(served))]
        if due:
            self._refresh_queue[pair] = bound

    def idle_for(self, pair: Pair) -> float:
        """Seconds since this node last served the pair (infinite when it does not remember):
        the binding's TTL says when it was last refreshed, which is minutes, not seconds."""
        at = self._served_at.get(pair)
        return float("inf") if at is None else self._clock() - at

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
        self._breaker.succeeded()
        self._m.refresh_writes.inc()
        # Pairs not returned moved or vanished (a notification says so) or another node was
        # extending them at that instant: their local deadlines stand, and past them the
        # entry is re-read.
        for row in rows:
            self._cache.extend(
                (row.api_key_id, row.model), row.backend, row.version, row.ttl, asked_at
            )
        return len(rows)

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
