"""The affinity engine: which backend serves an (API key, model) pair, on every node alike.

A hit is one dict lookup: no await, no database, no lock. Everything else (miss, expiry,
rebind) goes to the store, and concurrent callers for the same pair on this node share one
trip there (single flight), so a burst of N requests for a new pair costs one transaction
per node, and across nodes the store's advisory lock makes one of them the creator.

Affinity is a hint: when the store fails, the request is still served by the fallback
chooser (outcome `degraded`), and after a failure that looks like an outage a breaker keeps
every other request from asking (routing/breaker.py), so an outage costs no per-request
timeouts. Notifications are checked before they are believed (routing/trust.py). Staleness is
bounded: expired entries are swept, and while the listener is down, entries the database has
not confirmed for `blind_max_age_s` are re-read before they are used.
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
from affinity_node.routing.cache import BindingCache, Entry
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
from affinity_node.routing.trust import NotificationCheck
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


@dataclass(frozen=True, slots=True)
class Resolution:
    backend: str
    """The set's first member (or the backend to use when affinity cannot say)."""
    outcome: Outcome
    fanout: Members = NO_MEMBERS
    """The set's other members; a request may go to any healthy one."""
    version: int = 0
    """The binding's version (what a set change must find to succeed)."""


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
        is_known_backend: Callable[[str], bool] = lambda _backend: True,
    ) -> None:
        """`clock` times local deadlines and pauses (the cache must use the same one);
        `wall_clock` plus `db_clock_offset` dates notifications against the database clock;
        `is_known_backend` says which backends a notification may name."""
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
        self._check = NotificationCheck(settings.ttl_seconds, is_known_backend, clock)
        self._listener_up = False
        self._blind_since: float | None = clock()
        self._stale_before = -math.inf
        """Entries the database confirmed before this are re-read before use (while blind)."""
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
        for loop, name in (
            (self._refresh_loop, "affinity-refresh"),
            (self._cleanup_loop, "affinity-cleanup"),
            (self._sweep_loop, "affinity-sweep"),
        ):
            self._tasks.append(asyncio.create_task(loop(), name=name))

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
        await self._breaker.stop()
        await self.flush_refreshes()

    # -- the request path --------------------------------------------------------------------

    async def resolve(
        self, api_key_id: UUID, model: str, candidates: Sequence[str], choose: Chooser
    ) -> Resolution:
        """The backend for this pair among `candidates` (the model's healthy backends)."""
        pair = (api_key_id, model)
        entry = self._cache.get(pair)
        if (
            entry is not None
            and entry.deadline > self._clock()
            and entry.checked > self._stale_before
            and entry.backend in candidates
        ):
            return self._hit(model, entry)
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

    def _hit(self, model: str, entry: Entry) -> Resolution:
        counter = self._hit_counters.get(model)
        if counter is None:
            counter = self._hit_counters[model] = self._m.cache_hits.labels(model).inc
        counter()
        return Resolution(entry.backend, "hit", entry.fanout, entry.version)

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
        self, pair: Pair, candidates: tuple[str, ...], choose: Chooser
    ) -> Resolution:
        entry = self._cache.get(pair)
        if entry is not None and entry.deadline > self._clock():
            if entry.backend in candidates:
                if entry.checked > self._stale_before:
                    # A notification landed since the caller looked: it is a hit now.
                    return self._hit(pair[1], entry)
                return await self._miss(pair, candidates, choose)  # suspect: read it again
            # Cached but the bound backend is not a candidate (unhealthy or removed): move it,
            # to a member of its set when one can serve (that cache is warm already).
            return await self._rebind(
                pair, entry.backend, candidates, choose, "unhealthy", entry.fanout
            )
        return await self._miss(pair, candidates, choose)

    async def _miss(self, pair: Pair, candidates: tuple[str, ...], choose: Chooser) -> Resolution:
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
                pair, stored.backend, candidates, choose, "unhealthy", stored.fanout
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
    ) -> Resolution:
        if not self._breaker.allows():
            return self._degraded(pair, candidates, choose)
        stamp = self._cache.stamp()
        try:
            for _ in range(3):
                new = next((m for m in fanout if m in candidates), None) or choose(candidates)
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
                    return await self._miss(pair, candidates, choose)
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
            self._stale_before = -math.inf
            self._breaker.succeeded()
        else:
            if self._blind_since is None:
                self._blind_since = self._clock()
            self._breaker.trip()  # whatever the store does next is proven by a trial first
        self._publish_db_up()

    def _update_blindness(self, now: float) -> None:
        since = self._blind_since
        if since is not None and now - since > self._s.blind_grace_s:
            self._stale_before = now - self._s.blind_max_age_s
        else:
            self._stale_before = -math.inf

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
        entry = self._cache.get(pair)
        if entry is None or (entry.backend != backend and backend not in entry.fanout):
            return
        if entry.deadline - self._clock() < self._s.ttl_seconds / 2:
            self._refresh_queue[pair] = entry.backend

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
        """Delete expired rows in batches, if this node holds the cleaner lock."""
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
                return total
        return total

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.cleanup_interval_s)
            await self.cleanup_expired()

    # -- coherence ---------------------------------------------------------------------------

    def apply_event(self, event: BindingEvent | None) -> None:
        """A notification from the binding table, in commit order; None when unparseable."""
        if event is None:
            self._m.notifications_rejected.labels("malformed").inc()
            return
        self._m.notifications.labels(event.op).inc()
        reason = self._check.reason(event, self._cache.max_version)
        if reason is not None:
            self._m.notifications_rejected.labels(reason).inc()
            self._warn.warning(
                "untrusted",
                "ignoring an implausible binding notification (%s); "
                "the pair will be read from the database",
                reason,
            )
            self._cache.invalidate(event.pair)
            return
        lag = max(self._wall_clock() + self._db_clock_offset() - event.sent_at, 0.0)
        self._m.notify_lag.observe(lag)
        if event.op == "delete":
            self._cache.apply_delete(event.pair, event.version)
        else:
            self._cache.apply_change(
                event.pair, event.backend, event.version, event.ttl - lag, event.fanout
            )

    async def resync(self) -> None:
        """Reload the cache from a snapshot; called by the listener after each LISTEN."""
        self._cache.begin_resync()
        asked_at = self._clock()
        try:
            version_now = await self._store.version_now()
            rows = await self._store.snapshot(self._cache.max_entries)
        except BaseException:
            self._cache.abort_resync()
            raise
        self._cache.finish_resync(rows, asked_at, version_now)
        self._m.cache_resyncs.inc()
