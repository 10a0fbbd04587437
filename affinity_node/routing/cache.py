"""The node's in-memory view of the binding table: what makes a hit cost no database trip.

Writes come from three places that can race: notifications (in commit order), fills (a read
this node made, possibly slow), and snapshots (after a reconnect). Two rules order them:

- between notifications, the version decides: it comes from one database sequence, so an older
  version never replaces a newer one, and a delete leaves a tombstone carrying its own (newer)
  version;
- a fill is dropped when something newer happened to its pair after the read began: a newer
  version is cached, the pair was deleted or invalidated since (tombstones remember when, as a
  local stamp, not only which version), or a resync began since (the notifications it might
  have missed are gone).

Deadlines are local monotonic times derived from the database's remaining TTL, so node clocks
never decide expiry; `sweep` removes entries past their deadline, so they stop counting for
placement and gauges. Each entry also remembers when the database last confirmed it
(`checked`): the engine re-reads entries it has not heard about for too long while its
listener is down.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from affinity_node.routing.ports import BindingRow, Pair


class Entry:
    __slots__ = ("backend", "checked", "deadline", "version")

    def __init__(self, backend: str, version: int, deadline: float, checked: float) -> None:
        self.backend = backend
        self.version = version
        self.deadline = deadline
        self.checked = checked
        """When the database (a read, a write or a notification) last confirmed it."""


class BindingCache:
    def __init__(
        self,
        max_entries: int = 100_000,
        max_tombstones: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[Pair, Entry] = OrderedDict()
        self._tombstones: OrderedDict[Pair, tuple[int, int]] = OrderedDict()
        """pair -> (version of the delete, stamp when it was applied)."""
        self._max = max_entries
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._stamp = 0
        self._resync_stamp = 0
        self._touched: dict[Pair, int] | None = None
        self._per_backend: dict[str, int] = {}
        self._expiry: dict[int, list[Pair]] = {}
        """Whole seconds -> pairs whose deadline falls before it (some since extended)."""
        self.max_version = 0
        """The newest version seen in any row or notification."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_entries(self) -> int:
        return self._max

    def stamp(self) -> int:
        """A mark taken before a read: `fill` drops the result if its pair changed since."""
        return self._stamp

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

    def _seen(self, version: int) -> None:
        if version > self.max_version:
            self.max_version = version

    def _expire_at(self, pair: Pair, deadline: float) -> None:
        slot = int(deadline) + 1
        bucket = self._expiry.get(slot)
        if bucket is None:
            self._expiry[slot] = [pair]
        else:
            bucket.append(pair)

    def _put(self, pair: Pair, backend: str, version: int, deadline: float, checked: float) -> None:
        self._tombstones.pop(pair, None)
        self._seen(version)
        self._expire_at(pair, deadline)
        entry = self._entries.get(pair)
        if entry is None:
            self._entries[pair] = Entry(backend, version, deadline, checked)
            self._count(backend, 1)
            if len(self._entries) > self._max:
                _old, evicted = self._entries.popitem(last=False)
                self._count(evicted.backend, -1)
        else:
            if entry.backend != backend:
                self._count(entry.backend, -1)
                self._count(backend, 1)
            entry.backend, entry.version = backend, version
            entry.deadline, entry.checked = deadline, checked
            self._entries.move_to_end(pair)

    def fill(
        self, pair: Pair, backend: str, version: int, ttl: float, stamp: int, asked_at: float
    ) -> bool:
        """Store what this node read or wrote; False when it is stale and was dropped.

        `stamp` is `stamp()` taken before the query; `asked_at` the local time it was sent:
        counting the database's TTL from then makes the local deadline fall no later than the
        real expiry.
        """
        if stamp < self._resync_stamp:
            return False
        tomb = self._tombstones.get(pair)
        if tomb is not None and tomb[1] > stamp:
            return False
        entry = self._entries.get(pair)
        if entry is not None and version < entry.version and entry.deadline > self._clock():
            return False
        self._put(pair, backend, version, asked_at + ttl, asked_at)
        return True

    def _newest_known(self, pair: Pair) -> int:
        entry = self._entries.get(pair)
        if entry is not None:
            return entry.version
        tomb = self._tombstones.get(pair)
        return tomb[0] if tomb is not None else -1

    def apply_change(self, pair: Pair, backend: str, version: int, ttl: float) -> bool:
        """A notification of an insert or a move; `ttl` already net of the delivery lag."""
        if version < self._newest_known(pair):
            return False
        self._stamp += 1
        now = self._clock()
        self._put(pair, backend, version, now + ttl, now)
        if self._touched is not None:
            self._touched[pair] = version
        return True

    def apply_delete(self, pair: Pair, version: int) -> bool:
        if version < self._newest_known(pair):
            return False
        self._stamp += 1
        self._seen(version)
        self._drop(pair)
        self._tombstones[pair] = (version, self._stamp)
        self._tombstones.move_to_end(pair)
        if len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)
        if self._touched is not None:
            self._touched[pair] = version
        return True

    def invalidate(self, pair: Pair) -> None:
        """Forget a pair without claiming anything about it (an untrusted notification): the
        next request reads the row. Reads in flight stay valid (they come from the database)."""
        self._drop(pair)

    def _drop(self, pair: Pair) -> None:
        gone = self._entries.pop(pair, None)
        if gone is not None:
            self._count(gone.backend, -1)

    def extend(self, pair: Pair, backend: str, version: int, ttl: float, asked_at: float) -> None:
        """A refresh this node wrote: new deadline if the entry is still the same binding."""
        entry = self._entries.get(pair)
        if entry is not None and entry.backend == backend and entry.version == version:
            entry.deadline = asked_at + ttl
            entry.checked = asked_at
            self._expire_at(pair, entry.deadline)

    def evict(self, pair: Pair, backend: str | None = None) -> None:
        entry = self._entries.get(pair)
        if entry is not None and (backend is None or entry.backend == backend):
            self._drop(pair)

    def sweep(self, now: float | None = None) -> int:
        """Remove entries past their deadline; returns how many. Cheap when nothing is due."""
        now = self._clock() if now is None else now
        due = [slot for slot in self._expiry if slot <= now]
        removed = 0
        for slot in sorted(due):
            for pair in self._expiry.pop(slot):
                entry = self._entries.get(pair)
                if entry is not None and entry.deadline <= now:
                    self._drop(pair)
                    removed += 1
        return removed

    def begin_resync(self) -> None:
        """Called before the snapshot read: older fills are void from here on."""
        self._stamp += 1
        self._resync_stamp = self._stamp
        self._touched = {}

    def finish_resync(
        self, rows: Iterable[BindingRow], asked_at: float, version_now: int = 0
    ) -> None:
        """Replace the contents with the snapshot, keeping what notifications changed since."""
        touched = self._touched or {}
        self._touched = None
        fresh: OrderedDict[Pair, Entry] = OrderedDict()
        for row in reversed(list(rows)):  # the snapshot is newest first; LRU wants it last
            pair = (row.api_key_id, row.model)
            self._seen(row.version)
            if pair in touched:
                continue
            fresh[pair] = Entry(row.backend, row.version, asked_at + row.ttl, asked_at)
        for pair in touched:
            entry = self._entries.get(pair)
            if entry is not None:
                fresh[pair] = entry
        while len(fresh) > self._max:
            fresh.popitem(last=False)
        self._entries = fresh
        self._per_backend = {}
        self._expiry = {}
        for pair, entry in fresh.items():
            self._count(entry.backend, 1)
            self._expire_at(pair, entry.deadline)
        self._tombstones = OrderedDict((p, t) for p, t in self._tombstones.items() if p in touched)
        self._seen(version_now)

    def abort_resync(self) -> None:
        self._touched = None

    def items(self) -> list[tuple[Pair, Entry]]:
        return list(self._entries.items())
