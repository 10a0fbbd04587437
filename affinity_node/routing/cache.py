"""The node's in-memory view of the binding table: what makes a hit cost no database trip.

Writes come from three places that can race: notifications (in commit order), fills (a read
this node made, possibly slow), and snapshots (after a reconnect). One rule orders them all:
the binding's `version` comes from one database sequence, so an older version never replaces a
newer one, and a delete leaves a tombstone carrying its own (newer) version. A fill that began
before the latest resync is discarded: the notifications it might have missed are gone.

Deadlines are local monotonic times derived from the database's remaining TTL, so node clocks
never decide expiry; past its deadline an entry is re-read before it counts as a miss.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from affinity_node.routing.ports import BindingRow, Pair


class Entry:
    __slots__ = ("backend", "deadline", "version")

    def __init__(self, backend: str, version: int, deadline: float) -> None:
        self.backend = backend
        self.version = version
        self.deadline = deadline


class BindingCache:
    def __init__(
        self,
        max_entries: int = 100_000,
        max_tombstones: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[Pair, Entry] = OrderedDict()
        self._tombstones: OrderedDict[Pair, int] = OrderedDict()
        self._max = max_entries
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._epoch = 0
        self._touched: dict[Pair, int] | None = None
        self._per_backend: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def max_entries(self) -> int:
        return self._max

    def bindings_per_backend(self) -> dict[str, int]:
        """Cached bindings per backend (a copy): kept as entries change, O(backends) to read."""
        return {b: n for b, n in self._per_backend.items() if n}

    def bindings_of(self, backend: str) -> int:
        return self._per_backend.get(backend, 0)

    def _count(self, backend: str, delta: int) -> None:
        self._per_backend[backend] = self._per_backend.get(backend, 0) + delta

    def get(self, pair: Pair) -> Entry | None:
        entry = self._entries.get(pair)
        if entry is not None:
            self._entries.move_to_end(pair)
        return entry

    def _newest_known(self, pair: Pair) -> int:
        entry = self._entries.get(pair)
        if entry is not None:
            return entry.version
        return self._tombstones.get(pair, -1)

    def _put(self, pair: Pair, backend: str, version: int, deadline: float) -> None:
        self._tombstones.pop(pair, None)
        entry = self._entries.get(pair)
        if entry is None:
            self._entries[pair] = Entry(backend, version, deadline)
            self._count(backend, 1)
            if len(self._entries) > self._max:
                _old, evicted = self._entries.popitem(last=False)
                self._count(evicted.backend, -1)
        else:
            if entry.backend != backend:
                self._count(entry.backend, -1)
                self._count(backend, 1)
            entry.backend, entry.version, entry.deadline = backend, version, deadline
            self._entries.move_to_end(pair)

    def fill(
        self, pair: Pair, backend: str, version: int, ttl: float, epoch: int, asked_at: float
    ) -> bool:
        """Store what this node read or wrote; False when it is stale and was dropped.

        `asked_at` is the local time the query was sent: counting the database's TTL from
        then makes the local deadline fall no later than the real expiry.
        """
        if epoch != self._epoch or version < self._newest_known(pair):
            return False
        self._put(pair, backend, version, asked_at + ttl)
        return True

    def apply_change(self, pair: Pair, backend: str, version: int, ttl: float) -> bool:
        """A notification of an insert or a move; `ttl` already net of the delivery lag."""
        if version < self._newest_known(pair):
            return False
        self._put(pair, backend, version, self._clock() + ttl)
        if self._touched is not None:
            self._touched[pair] = version
        return True

    def apply_delete(self, pair: Pair, version: int) -> bool:
        if version < self._newest_known(pair):
            return False
        gone = self._entries.pop(pair, None)
        if gone is not None:
            self._count(gone.backend, -1)
        self._tombstones[pair] = version
        self._tombstones.move_to_end(pair)
        if len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)
        if self._touched is not None:
            self._touched[pair] = version
        return True

    def extend(self, pair: Pair, backend: str, version: int, ttl: float, asked_at: float) -> None:
        """A refresh this node wrote: new deadline if the entry is still the same binding."""
        entry = self._entries.get(pair)
        if entry is not None and entry.backend == backend and entry.version == version:
            entry.deadline = asked_at + ttl

    def evict(self, pair: Pair, backend: str | None = None) -> None:
        entry = self._entries.get(pair)
        if entry is not None and (backend is None or entry.backend == backend):
            del self._entries[pair]
            self._count(entry.backend, -1)

    def begin_resync(self) -> None:
        """Called before the snapshot read: older fills are void from here on."""
        self._epoch += 1
        self._touched = {}

    def finish_resync(self, rows: Iterable[BindingRow], asked_at: float) -> None:
        """Replace the contents with the snapshot, keeping what notifications changed since."""
        touched = self._touched or {}
        self._touched = None
        fresh: OrderedDict[Pair, Entry] = OrderedDict()
        for row in reversed(list(rows)):  # the snapshot is newest first; LRU wants it last
            pair = (row.api_key_id, row.model)
            if pair in touched:
                continue
            fresh[pair] = Entry(row.backend, row.version, asked_at + row.ttl)
        for pair in touched:
            entry = self._entries.get(pair)
            if entry is not None:
                fresh[pair] = entry
        while len(fresh) > self._max:
            fresh.popitem(last=False)
        self._entries = fresh
        self._per_backend = {}
        for entry in fresh.values():
            self._count(entry.backend, 1)
        self._tombstones = OrderedDict((p, v) for p, v in self._tombstones.items() if p in touched)

    def abort_resync(self) -> None:
        self._touched = None

    def items(self) -> list[tuple[Pair, Entry]]:
        return list(self._entries.items())
