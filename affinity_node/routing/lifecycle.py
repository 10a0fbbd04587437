"""Backends joining, draining and leaving while the fleet serves.

The registry (a table every node follows) adds backends at runtime and holds the admin state of
any backend: `active`, `draining` (no new bindings or set membership; its bindings are moved off)
or `disabled` (serves nothing). `apply_registry` makes a node's backend pool match it.

The mover runs on every node, but moves are paced fleet-wide: before each move a node must take
the one move slot in the database (one per interval for the whole fleet), so however many nodes
run it, drains and rebalances go at the configured rate. Each move is a compare-and-set on the
binding (reason `drain` or `rebalance`), so every node follows it by notification.

- Drain: bindings that hold a draining backend are moved to the active backend holding the
  fewest bindings (or, when the pair has a set, to another member), at `drain_moves_per_s`, faster
  when a deadline needs it. In-flight requests finish where they are.
- Rebalance evens load, not binding counts: when the active backends' load has been skewed for
  `rebalance_after_s` (one above `rebalance_skew` x the mean, or below the mean /
  `rebalance_skew`, and at least `REBALANCE_MIN_GAP` requests from the other end), the binding
  idle the longest on the busiest backend (and not served for `REBALANCE_IDLE_S`: a busy
  pair's move costs its cache, and its set grows if it is hot) moves to the least busy one, at
  `rebalance_moves_per_minute`, until half of the threshold's excess is left (1.125 for a
  threshold of 1.25). Load is what every node reads alike (routing/load_view.py: each
  backend's running and waiting requests), smoothed over `LOAD_SMOOTHING_S` so a burst moves
  nothing. A backend holding a single binding is not evened by moves (its pair's set grows
  instead, routing/fanout.py). Below `REBALANCE_MIN_LOAD` requests per backend the load says
  nothing about where the next load lands, and binding counts stand in for it (a backend
  added to an idle fleet is filled with bindings before the traffic comes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from affinity_node.routing.backends import Backend, BackendPool, BackendSpec, normalise_url
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.load_view import LoadView
from affinity_node.routing.ports import Clock, MoverStore, RegistryEntry
from affinity_node.vocabulary import CACHE_KINDS, MoveReason


def apply_registry(backends: BackendPool, entries: Sequence[RegistryEntry]) -> list[str]:
    """Make the backend pool match the registry; returns what changed, for the log."""
    changes: list[str] = []
    wanted: dict[str, RegistryEntry] = {}
    for entry in entries:
        try:
            wanted[normalise_url(entry.url)] = entry
        except ValueError:
            continue  # not a URL this node can use: ignore the row, keep serving
    for url, entry in wanted.items():
        backend = backends.get(url)
        if backend is None and entry.added:
            try:
                backend = backends.add(BackendSpec(url, entry.kind, entry.models), "registry")
            except ValueError:
                continue  # a kind from a newer version (mid-upgrade): the rest still applies
            changes.append(f"{url} added")
        if backend is None:
            continue
        backend.drain_deadline = entry.drain_deadline
        if backends.set_state(backend, entry.state):
            changes.append(f"{url} {entry.state}")
    for backend in backends.backends:
        current = wanted.get(backend.id)
        if backend.origin == "registry" and (current is None or not current.added):
            backends.remove(backend.id)
            changes.append(f"{backend.id} removed")
        elif (
            current is None and backend.origin == "config" and backends.set_state(backend, "active")
        ):
            changes.append(f"{backend.id} active")
    return changes


def apply_static(backends: BackendPool, specs: Sequence[BackendSpec]) -> list[str]:
    """Make the config's backends (origin `config`) match a reloaded `backends:` list, as the
    registry's are: new ones join, gone ones leave (their bindings move on the next hit);
    backends from the registry or DNS are not touched. Returns what changed, for the log."""
    wanted = {normalise_url(s.url): s for s in specs}
    changes: list[str] = []
    for url, spec in wanted.items():
        if backends.get(url) is None:
            backends.add(BackendSpec(url, spec.kind, tuple(spec.models)), "config")
            changes.append(f"{url} added")
    for backend in backends.backends:
        if backend.origin == "config" and backend.id not in wanted:
            backends.remove(backend.id)
            changes.append(f"{backend.id} removed")
    return changes


LOAD_SMOOTHING_S = 5.0
"""Time constant of the load the rebalance compares (an exponential moving average)."""
REBALANCE_MIN_LOAD = 2.0
"""Mean requests per backend below which binding counts stand in for the load."""
REBALANCE_MIN_GAP = 4.0
"""Requests between the busiest and the least busy backend below which no load is skewed."""
REBALANCE_IDLE_S = 30.0
"""Under load only pairs this node has not served for this long move: moving a busy pair
costs its whole prefix cache (the TTL's refresh time says nothing within minutes)."""
REBALANCE_CANDIDATES = 20
"""Bindings idle the longest (by TTL) looked at per move."""


@dataclass(frozen=True, slots=True)
class Skew:
    """The active backends' spread, by load (or, when idle, by binding count)."""

    busiest: Backend
    idlest: Backend
    most: float
    least: float
    mean: float
    by_load: bool


@dataclass(frozen=True, slots=True)
class MoverRules:
    drain_moves_per_s: float = 2.0
    rebalance: bool = True
    rebalance_moves_per_minute: float = 30.0
    rebalance_skew: float = 1.25
    """Bindings over (or under) the mean by this factor count as skewed."""
    rebalance_after_s: float = 10.0


class Mover:
    def __init__(
        self,
        engine: AffinityEngine,
        backends: BackendPool,
        store: MoverStore,
        rules: MoverRules,
        clock: Clock = time.monotonic,
    ) -> None:
        self._engine = engine
        self._backends = backends
        self._store = store
        self.rules = rules
        self._clock = clock
        self._skewed_since: float | None = None
        self._moving = False
        self._smoothed: dict[str, float] = {}
        self._smoothed_at: float | None = None

    def _bindings(self, backend: Backend) -> int:
        return self._engine.cache.bindings_of(backend.id)

    async def tick(self) -> MoveReason | None:
        """At most one move, when one is due and this node took the fleet's slot."""
        draining = [b for b in self._backends.backends if b.state == "draining"]
        if draining:
            return await self._drain(draining)
        if self.rules.rebalance:
            return await self._rebalance()
        return None

    def drain_interval(self, draining: Sequence[Backend]) -> float:
        """Seconds between moves: the configured pace, faster when a deadline needs it."""
        interval = 1.0 / self.rules.drain_moves_per_s
        now = datetime.now(UTC)
        for backend in draining:
            deadline = backend.drain_deadline
            left = self._bindings(backend)
            if deadline is not None and left:
                seconds = (deadline - now).total_seconds()
                interval = min(interval, max(seconds, 0.0) / (left + 1))
        return max(interval, 0.01)

    async def _drain(self, draining: Sequence[Backend]) -> MoveReason | None:
        ids = {b.id for b in draining}
        if not await self._store.take_move_slot(self.drain_interval(draining)):
            return None
        rows = await self._store.on_backends(sorted(ids), 1)
        if not rows:
            return None
        row = rows[0]
        pair = (row.api_key_id, row.model)
        if row.backend not in ids:  # only a set member is draining: the set shrinks
            kept = tuple(m for m in row.fanout if m not in ids)
            ok = await self._engine.set_members(pair, row.version, kept, "shrink", "drain")
            return "drain" if ok else None
        members = [m for m in row.fanout if m not in ids and self._serves(m, row.model)]
        target = members[0] if members else self._least_bound(row.model, exclude=ids)
        if target is None:
            return None
        ok = await self._engine.move(pair, row.backend, target, "drain")
        return "drain" if ok else None

    def _serves(self, backend_id: str, model: str) -> bool:
        backend = self._backends.get(backend_id)
        return (
            backend is not None
            and backend.state == "active"
            and backend in (self._backends.candidates(model))
        )

    def _least_bound(self, model: str, exclude: set[str]) -> str | None:
        choices = [
            b for b in self._backends.candidates(model)
            if b.kind in CACHE_KINDS and b.state == "active" and b.id not in exclude
        ]  # fmt: skip
        if not choices:
            return None
        return min(choices, key=self._bindings).id

    def _loads(self, active: Sequence[Backend]) -> dict[str, float]:
        """Each backend's load, smoothed over LOAD_SMOOTHING_S of this mover's ticks."""
        now = self._clock()
        last, self._smoothed_at = self._smoothed_at, now
        weight = 1.0 if last is None else 1.0 - math.exp(-(now - last) / LOAD_SMOOTHING_S)
        smoothed: dict[str, float] = {}
        for backend in active:
            load = LoadView.load(backend)
            before = self._smoothed.get(backend.id)
            smoothed[backend.id] = load if before is None else before + weight * (load - before)
        self._smoothed = smoothed
        return smoothed

    def skew(self) -> Skew | None:
        """Busiest and least busy of the active vllm and llamacpp backends: by load, or by
        bindings when the fleet is too idle for its load to say anything."""
        active = [
            b
            for b in self._backends.backends
            if b.kind in CACHE_KINDS and b.state == "active" and b.healthy and b.models
        ]
        if len(active) < 2:
            self._smoothed_at = None
            return None
        values = self._loads(active)
        by_load = sum(values.values()) / len(active) >= REBALANCE_MIN_LOAD
        if not by_load:
            values = {b.id: float(self._bindings(b)) for b in active}
        mean = sum(values.values()) / len(active)
        if mean <= 0:
            return None
        busiest = max(active, key=lambda b: values[b.id])
        idlest = min(active, key=lambda b: values[b.id])
        return Skew(busiest, idlest, values[busiest.id], values[idlest.id], mean, by_load)

    def _skewed(self, found: Skew) -> bool:
        """Whether a move would narrow a gap the threshold calls skewed. Once moving, go on
        until half the threshold's excess is left: no flapping at the threshold, and an added
        backend ends near the mean rather than at the edge."""
        skew = self.rules.rebalance_skew
        limit = 1 + (skew - 1) / 2 if self._moving else skew
        gap = REBALANCE_MIN_GAP if found.by_load else 2.0
        if found.most - found.least < gap:
            return False
        if found.by_load and self._bindings(found.busiest) < 2:
            return False  # one pair: its set grows instead
        return found.most > limit * found.mean or found.least < found.mean / limit

    async def _rebalance(self) -> MoveReason | None:
        found = self.skew()
        now = self._clock()
        if found is None or not self._skewed(found):
            self._skewed_since = None
            self._moving = False
            return None
        if self._skewed_since is None:
            self._skewed_since = now
        if now - self._skewed_since < self.rules.rebalance_after_s:
            return None
        self._moving = True
        if not await self._store.take_move_slot(60.0 / self.rules.rebalance_moves_per_minute):
            return None
        busiest, idlest = found.busiest, found.idlest
        for row in await self._store.idle_bindings(busiest.id, REBALANCE_CANDIDATES):
            pair = (row.api_key_id, row.model)
            if found.by_load and self._engine.idle_for(pair) < REBALANCE_IDLE_S:
                continue
            if idlest in self._backends.candidates(row.model):
                ok = await self._engine.move(pair, busiest.id, idlest.id, "rebalance")
                return "rebalance" if ok else None
        return None
