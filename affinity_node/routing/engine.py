"""The affinity engine: which backend serves an (API key, model) pair, on every node alike.

A hit is one dict lookup: no await, no database, no lock. Everything else (miss, expiry,
rebind) goes to the store, and concurrent callers for the same pair on this node share one
trip there (single flight), so a burst of N requests for a new pair costs one transaction
per node, and across nodes the store's advisory lock makes one of them the creator.

Affinity is a hint: when the store fails, the request is still served by the fallback
chooser (outcome `degraded`), and after a failure that looks like an outage a breaker keeps
every other request from asking (routing/breaker.py), so an outage costs no per-request
timeouts. How the cache stays equal to the table (doorbells, watermark, resync, snapshot,
re-reading entries while the listener is down) is routing/coherence.py; expired entries are
swept here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.observability.tracing import traced
from affinity_node.routing.breaker import StoreBreaker
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.coherence import Coherence, SyncStatus
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.ports import (
    NO_MEMBERS,
    BindingEvent,
    BindingStore,
    Clock,
    Members,
    Pair,
    StoredBinding,
    StoreUnavailable,
)
from affinity_node.routing.upkeep import Upkeep
from affinity_node.tasks import Pending, Periodic, every, stop_all
from affinity_node.vocabulary import (
    FanoutDirection,
    FanoutReason,
    MissOutcome,
    MoveReason,
    Outcome,
    RebindReason,
)

log = logging.getLogger(__name__)

Chooser = Callable[[Sequence[str]], str]
"""The fallback strategy: picks one of the candidate backends."""
Successor = Callable[[Pair, Sequence[str]], str]
"""Where a pair goes when its backend can no longer serve it (the same answer on every node,
so a retry and the rebind after it agree)."""


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
    deadline: float = 0.0
    """A hit's cached deadline (0: not read), so the request's success need not read it."""


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
        self._m = metrics
        self._s = settings = settings or EngineSettings()
        self._inflight: dict[Pair, asyncio.Task[Resolution]] = {}
        self._degraded_pins: OrderedDict[Pair, str] = OrderedDict()
        self._breaker = StoreBreaker(
            self._trial, self._breaker_changed, clock, pause_s=settings.db_retry_after_s
        )
        self._sync = Coherence(
            store, cache, metrics, settings, self._store_failed, clock, wall_clock, db_clock_offset
        )
        self._upkeep = Upkeep(
            store, cache, metrics, settings, self._breaker, self._store_failed, clock
        )
        self._tasks: list[Periodic] = []
        self._background = Pending()
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

    @property
    def sync_status(self) -> SyncStatus:
        return self._sync.status

    @property
    def watermark(self) -> int:
        return self._sync.watermark

    @property
    def doorbells_pending(self) -> bool:
        """A doorbell's read is waiting or in flight."""
        return self._sync.doorbells_pending

    # -- what the listener reports (routing/coherence.py does the work) ----------------------

    def doorbell(self, event: BindingEvent | None) -> None:
        """A notification on the binding channel (None when unparseable)."""
        self._sync.doorbell(event)

    def advance_watermark(self, version: int) -> None:
        self._sync.advance_watermark(version)

    async def resync(self) -> None:
        """Called by the listener after each LISTEN, before it reports itself up."""
        await self._sync.resync()

    def listener_state(self, up: bool) -> None:
        """The listener connected (and synced) or lost its connection."""
        self._m.listener_up.set(1 if up else 0)
        self._sync.listener_changed(up)
        if up:
            self._breaker.succeeded()
        else:
            self._breaker.trip()  # whatever the store does next is proven by a trial first
        self._publish_db_up()

    # -- lifecycle ---------------------------------------------------------------------------

    def start_background(self) -> None:
        """The periodic duties: refresh writes, expired rows, the cache's sweep (an error
        ends one round, not the duty)."""
        s = self._s
        self._tasks = [
            every(s.refresh_flush_interval_s, self.flush_refreshes, "affinity-refresh"),
            every(s.cleanup_interval_s, self.cleanup_expired, "affinity-cleanup"),
            every(s.sweep_interval_s, self._sweep_once, "affinity-sweep"),
        ]

    async def stop(self) -> None:
        """Stops the loops and writes the refreshes still queued."""
        await self._sync.stop()
        tasks, self._tasks = self._tasks, []
        await stop_all(*tasks)
        await self._background.finish()
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
        if hit is not None:
            backend, version, deadline, checked, fanout = hit
            if (
                deadline > self._clock()
                and checked > self._sync.stale_before
                and backend in candidates
            ):
                return self._hit(model, backend, fanout, version, deadline)
        if not candidates:
            raise NoCandidates(model)
        task = self._inflight.get(pair)
        leader = task is None
        if task is None:
            slow = self._resolve_slow(pair, tuple(candidates), choose, successor)
            # the database's part of a request's trace (tracing on)
            task = asyncio.create_task(traced("affinity.store", slow))
            self._inflight[pair] = task
            task.add_done_callback(lambda _t: self._inflight.pop(pair, None))
        result = await asyncio.shield(task)
        if not leader:
            result = self._as_follower(pair, result, candidates, choose)
        return result

    def peek(self, pair: Pair) -> Resolution | None:
        """The pair's live binding as cached, or None: no I/O, nothing counted (for watching a
        pair's load when its request is routed by something else, a stored response's owner)."""
        hit = self._cache.lookup(pair)
        if hit is None:
            return None
        backend, version, deadline, _checked, fanout = hit
        return Resolution(backend, "hit", fanout, version) if deadline > self._clock() else None

    def _hit(
        self, model: str, backend: str, fanout: Members, version: int, deadline: float
    ) -> Resolution:
        counter = self._hit_counters.get(model)
        if counter is None:
            counter = self._hit_counters[model] = self._m.cache_hits.labels(model).inc
        counter()
        return Resolution(backend, "hit", fanout, version, deadline)

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
        hit = self._cache.lookup(pair)
        if hit is None:
            return await self._miss(pair, candidates, choose, successor)
        backend, version, deadline, checked, fanout = hit
        if deadline > self._clock():
            if backend in candidates:
                if checked > self._sync.stale_before:
                    # A notification landed since the caller looked: it is a hit now.
                    return self._hit(pair[1], backend, fanout, version, deadline)
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
        self._m.db_up.set(1 if self._sync.listener_up and self._breaker.closed else 0)

    def _sweep_once(self) -> None:
        now = self._clock()
        self._cache.sweep(now)
        self._sync.update_blindness(now)

    # -- after the response (routing/upkeep.py batches the refreshes) ------------------------

    def served(self, api_key_id: UUID, model: str, backend: str, deadline: float = 0.0) -> None:
        """A request bound to `backend` (any member of the pair's set) succeeded there;
        `deadline`: the binding's, as its resolution read it (0: not known)."""
        self._upkeep.served((api_key_id, model), backend, deadline)

    def idle_for(self, pair: Pair) -> float:
        """Seconds since this node last served the pair (a load balancer spreads every busy
        pair over all nodes, so each node's figure is the fleet's, give or take)."""
        return self._upkeep.idle_for(pair)

    async def flush_refreshes(self) -> int:
        return await self._upkeep.flush_refreshes()

    async def cleanup_expired(self) -> int:
        return await self._upkeep.cleanup_expired()

    def failed_over(self, api_key_id: UUID, model: str, bound: str, served_by: str) -> None:
        """The bound backend failed and `served_by` succeeded: move the binding (CAS)."""
        pair = (api_key_id, model)
        self._background.start(self._failover(pair, bound, served_by), "affinity-failover")

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
