"""The node's in-memory view of the binding table: what makes a hit cost no database trip.

Writes come from three places that can race: notifications (in commit order), fills (a read
this node made, possibly slow), and snapshots or catch-ups (after a reconnect). Two rules order
them:

- between notifications, the version decides: it comes from one database sequence, so an older
  version never replaces a newer one, and a delete leaves a tombstone carrying its own (newer)
  version;
- a fill is dropped when something newer happened to its pair after the read began: a newer
  version is cached, the pair was deleted or invalidated since (tombstones remember when, as a
  local stamp, not only which version), or a resync began since (the notifications it might
  have missed are gone). Snapshot pages and catch-up rows are fills, each page with its own
  stamp, so the cache stays live (and serves) while they load.

Deadlines are local monotonic times derived from the database's remaining TTL, so node clocks
never decide expiry; `sweep` removes entries past their deadline, so they stop counting for
placement and gauges. Each entry also remembers when the database last confirmed it
(`checked`): the engine re-reads entries it has not heard about for too long while its
listener is down.

Layout (a million entries is the planning size, so no Python object per entry): an entry is a
slot in parallel `array`s (key id as two 64-bit halves, model and backend as small interned
indexes, version, deadline, checked); pairs find their slot through 256 open-addressing tables
(linear probing, deletion by backward shift), each small enough to regrow in milliseconds.
About 60-70 bytes an entry, against ~190 for a dict of slot numbers and ~400 for a dict of
objects. Sets (fan-out members) are few and live in a dict. The least recently used order is
gone: when a size bound is set and reached, the entries closest to their deadline go first
(what is used gets refreshed, so that is close to least recently used), counted as evictions.
This layout is why the module runs past the 500 lines others keep to: the probing, the slot
arrays and the inlined hot loops (`lookup`, `load_page`) share private state and are one data
structure; splitting them would put an attribute hop on every hit and every snapshot row.
"""

from __future__ import annotations

import heapq
import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from uuid import UUID

from affinity_node.routing.ports import NO_MEMBERS, Members, Pair, RowTuple, SnapshotPage
from affinity_node.vocabulary import EvictReason

_SHARD_BITS = 8
_SHARDS = 1 << _SHARD_BITS
_SHARD_MASK = _SHARDS - 1
_HOME_MASK = 0xFFFFFFFF
_LOW64 = (1 << 64) - 1
_FREE = 0xFFFF
"""Model index of a free slot."""
_MAX_IDS = 0xFFFF
"""Interned models (and backends) at once: ids fit an unsigned short."""

Hit = tuple[str, int, float, float, Members]
"""(backend, version, deadline, checked, fanout): what the request path reads of an entry.
Readers unpack it by these names (`backend, version, deadline, checked, fanout = hit`), never
index it. A plain tuple on purpose: building a NamedTuple per hit cost ~300 ns against ~30 ns
for the tuple (a hit is ~1.3 us), and unpacking costs what indexing did."""


class Entry:
    """A copy of one cached binding (changing it changes nothing in the cache)."""

    __slots__ = ("backend", "checked", "deadline", "fanout", "version")

    def __init__(
        self, backend: str, version: int, deadline: float, checked: float, fanout: Members
    ) -> None:
        self.backend = backend
        """The set's first member (the binding's provider_url)."""
        self.version = version
        self.deadline = deadline
        self.checked = checked
        """When the database (a read, a write or a notification) last confirmed it."""
        self.fanout = fanout
        """The set's other members, oldest first (usually none)."""


class _Names:
    """Strings interned to small ids, freed when nothing refers to them (counted)."""

    __slots__ = ("free", "ids", "names", "refs")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.refs: list[int] = []
        self.free: list[int] = []

    def acquire(self, name: str) -> int:
        """The id of `name` with one more reference; -1 when every id is taken."""
        i = self.ids.get(name)
        if i is None:
            if self.free:
                i = self.free.pop()
                self.names[i] = name
            elif len(self.names) < _MAX_IDS:
                i = len(self.names)
                self.names.append(name)
                self.refs.append(0)
            else:
                return -1
            self.ids[name] = i
        self.refs[i] += 1
        return i

    def release(self, i: int) -> None:
        self.refs[i] -= 1
        if self.refs[i] == 0:
            del self.ids[self.names[i]]
            self.free.append(i)


class BindingCache:
    def __init__(
        self,
        max_entries: int = 0,
        max_tombstones: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[EvictReason, int], None] | None = None,
    ) -> None:
        """`max_entries` 0: no bound (the cache follows the table). `on_evict` hears of live
        entries evicted for size and of expired ones swept."""
        self._max = max_entries
        self._max_tombstones = max_tombstones
        self._clock = clock
        self._on_evict = on_evict
        # per slot
        self._hi = array("Q")
        self._lo = array("Q")
        self._model = array("H")
        self._home = array("I")
        self._backend = array("H")
        self._version = array("q")
        self._deadline = array("d")
        self._checked = array("d")
        self._gen = array("I")
        """The resync generation that last wrote the slot (a full load prunes older ones)."""
        self._free = array("i")
        self._count = 0
        # pair -> slot
        self._tables = [array("i", bytes(4 * 8)) for _ in range(_SHARDS)]
        self._masks = [7] * _SHARDS
        self._filled = [0] * _SHARDS
        self._models = _Names()
        self._model_ids = self._models.ids
        self._salts: list[int] = []
        """Per model id, mixed into the hash (random per process: no crafted collisions)."""
        self._backends = _Names()
        self._backend_names = self._backends.names
        self._fanout: dict[int, Members] = {}
        """Slot -> the set's other members, for the entries with more than one (a handful)."""
        self._expiry: dict[int, array[int]] = {}
        """Whole seconds -> slots whose deadline falls before it (some since extended)."""
        self._expiry_heap: list[int] = []
        self._tombstones: OrderedDict[tuple[int, str], tuple[int, int]] = OrderedDict()
        """(key id as an int, model) -> (version of the delete, stamp when it was applied)."""
        self._stamp = 0
        self._resync_stamp = 0
        self._generation = 0
        self.max_version = 0
        """The newest version seen in any row or notification."""

    def __len__(self) -> int:
        return self._count

    @property
    def max_entries(self) -> int:
        """The size bound (0: none)."""
        return self._max

    def stamp(self) -> int:
        """A mark taken before a read: `fill` drops the result if its pair changed since."""
        return self._stamp

    def bindings_per_backend(self) -> dict[str, int]:
        """Cached bindings per backend (first members): kept as entries change."""
        b = self._backends
        return {b.names[i]: n for i, n in enumerate(b.refs) if n}

    def bindings_of(self, backend: str) -> int:
        i = self._backends.ids.get(backend)
        return 0 if i is None else self._backends.refs[i]

    def seen(self, version: int) -> None:
        if version > self.max_version:
            self.max_version = version

    def nbytes(self) -> int:
        """What the arrays and tables hold (Python's own object overheads aside)."""
        arrays: list[array[int] | array[float]] = [self._hi, self._lo, self._model, self._home]
        arrays += [self._backend, self._version, self._deadline, self._checked, self._gen]
        total = sum(a.buffer_info()[1] * a.itemsize for a in [*arrays, self._free])
        total += sum(len(t) * 4 for t in self._tables)
        return total + sum(len(b) * 4 for b in self._expiry.values())

    # -- finding a pair ----------------------------------------------------------------------

    def _find(self, u: int, mid: int) -> int:
        """The slot of (key id as an int, model id), or -1."""
        h = hash(u ^ self._salts[mid])
        shard = h & _SHARD_MASK
        table = self._tables[shard]
        mask = self._masks[shard]
        i = (h >> _SHARD_BITS) & mask
        lo = u & _LOW64
        while True:
            s = table[i] - 1
            if s < 0:
                return -1
            if self._lo[s] == lo and self._model[s] == mid and self._hi[s] == u >> 64:
                return s
            i = (i + 1) & mask

    def _slot_of(self, pair: Pair) -> int:
        mid = self._model_ids.get(pair[1])
        return -1 if mid is None else self._find(pair[0].int, mid)

    def lookup(self, pair: Pair) -> Hit | None:
        """The request path's read (`_find` inlined): no object per entry, one tuple."""
        mid = self._model_ids.get(pair[1])
        if mid is None:
            return None
        u = pair[0].int
        h = hash(u ^ self._salts[mid])
        shard = h & _SHARD_MASK
        table = self._tables[shard]
        mask = self._masks[shard]
        i = (h >> _SHARD_BITS) & mask
        lo = u & _LOW64
        while True:
            s = table[i] - 1
            if s < 0:
                return None
            if self._lo[s] == lo and self._model[s] == mid and self._hi[s] == u >> 64:
                return (
                    self._backend_names[self._backend[s]],
                    self._version[s],
                    self._deadline[s],
                    self._checked[s],
                    self._fanout.get(s, NO_MEMBERS),
                )
            i = (i + 1) & mask

    def get(self, pair: Pair) -> Entry | None:
        hit = self.lookup(pair)
        return None if hit is None else Entry(*hit)

    def _entry(self, s: int) -> Entry:
        return Entry(
            self._backends.names[self._backend[s]],
            self._version[s],
            self._deadline[s],
            self._checked[s],
            self._fanout.get(s, NO_MEMBERS),
        )

    def _pair(self, s: int) -> Pair:
        return (UUID(int=self._hi[s] << 64 | self._lo[s]), self._models.names[self._model[s]])

    # -- the tables --------------------------------------------------------------------------

    def _new_slot(self, u: int, mid: int) -> int:
        """Takes a slot for a pair known to be absent and links it (model id already held)."""
        h = hash(u ^ self._salts[mid])
        home = (h >> _SHARD_BITS) & _HOME_MASK
        if self._free:
            s = self._free.pop()
            self._hi[s], self._lo[s], self._model[s], self._home[s] = u >> 64, u & _LOW64, mid, home
        else:
            s = len(self._model)
            self._hi.append(u >> 64)
            self._lo.append(u & _LOW64)
            self._model.append(mid)
            self._home.append(home)
            self._backend.append(0)
            self._version.append(0)
            self._deadline.append(0.0)
            self._checked.append(0.0)
            self._gen.append(0)
        shard = h & _SHARD_MASK
        if (self._filled[shard] + 1) * 2 > self._masks[shard] + 1:
            self._grow(shard)
        table, mask = self._tables[shard], self._masks[shard]
        i = home & mask
        while table[i]:
            i = (i + 1) & mask
        table[i] = s + 1
        self._filled[shard] += 1
        self._count += 1
        return s

    def _grow(self, shard: int) -> None:
        old = self._tables[shard]
        mask = self._masks[shard] * 2 + 1
        table = array("i", bytes(4 * (mask + 1)))
        home = self._home
        for s1 in old:
            if s1:
                i = home[s1 - 1] & mask
                while table[i]:
                    i = (i + 1) & mask
                table[i] = s1
        self._tables[shard] = table
        self._masks[shard] = mask

    def reserve(self, entries: int) -> None:
        """Grow the tables for about `entries` pairs now, not one shard at a time during a
        snapshot."""
        per_shard = entries // _SHARDS + 2 * int((entries // _SHARDS) ** 0.5) + 1
        for shard in range(_SHARDS):
            while (per_shard + 1) * 2 > self._masks[shard] + 1:
                self._grow(shard)

    def _unlink(self, s: int) -> None:
        """Takes slot `s` out of its table (backward shift: no tombstones in the table)."""
        h = hash((self._hi[s] << 64 | self._lo[s]) ^ self._salts[self._model[s]])
        shard = h & _SHARD_MASK
        table, mask, home = self._tables[shard], self._masks[shard], self._home
        i = self._home[s] & mask
        while table[i] != s + 1:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            s1 = table[j]
            if not s1:
                break
            k = home[s1 - 1] & mask
            if (k <= i or k > j) if i <= j else (k <= i and k > j):
                table[i] = s1
                i = j
        table[i] = 0
        self._filled[shard] -= 1

    def _drop(self, s: int) -> None:
        self._unlink(s)
        self._backends.release(self._backend[s])
        self._models.release(self._model[s])
        self._model[s] = _FREE
        self._fanout.pop(s, None)
        self._free.append(s)
        self._count -= 1

    def _expire_at(self, s: int, deadline: float) -> None:
        second = int(deadline) + 1
        bucket = self._expiry.get(second)
        if bucket is None:
            self._expiry[second] = array("i", (s,))
            heapq.heappush(self._expiry_heap, second)
        else:
            bucket.append(s)

    def _put(
        self,
        pair: Pair,
        backend: str,
        version: int,
        deadline: float,
        checked: float,
        fanout: Members,
        s: int = -2,
    ) -> None:
        """Write an entry (`s`: its slot when the caller looked it up, -1 when absent)."""
        self._tombstones.pop((pair[0].int, pair[1]), None)
        self.seen(version)
        if s == -2:
            s = self._slot_of(pair)
        self._write(pair[0].int, pair[1], s, backend, version, deadline, checked, fanout)

    def _write(
        self,
        u: int,
        model: str,
        s: int,
        backend: str,
        version: int,
        deadline: float,
        checked: float,
        fanout: Members,
    ) -> None:
        if s < 0:
            mid = self._models.acquire(model)
            if mid < 0:
                return  # every model id taken: not cached (the table still answers)
            if mid == len(self._salts):
                self._salts.append(random.getrandbits(64))
            bid = self._backends.acquire(backend)
            if bid < 0:
                self._models.release(mid)
                return
            s = self._new_slot(u, mid)
            self._backend[s] = bid
        elif self._backends.names[self._backend[s]] != backend:
            bid = self._backends.acquire(backend)
            if bid < 0:
                self._drop(s)
                return
            self._backends.release(self._backend[s])
            self._backend[s] = bid
        self._version[s] = version
        self._deadline[s] = deadline
        self._checked[s] = checked
        self._gen[s] = self._generation
        if fanout:
            self._fanout[s] = fanout
        else:
            self._fanout.pop(s, None)
        self._expire_at(s, deadline)
        if self._max and self._count > self._max:
            self._evict_nearest()

    def _evict_nearest(self) -> None:
        """Evicts the entry closest to its deadline (size bound reached)."""
        heap, expiry, deadline, model = self._expiry_heap, self._expiry, self._deadline, self._model
        while heap:
            second = heap[0]
            bucket = expiry.get(second)
            if not bucket:
                heapq.heappop(heap)
                expiry.pop(second, None)
                continue
            s = bucket.pop()
            if model[s] != _FREE and int(deadline[s]) + 1 == second:
                self._drop(s)
                if self._on_evict is not None:
                    self._on_evict("size", 1)
                return

    # -- writes ------------------------------------------------------------------------------

    def fill(
        self,
        pair: Pair,
        backend: str,
        version: int,
        ttl: float,
        stamp: int,
        asked_at: float,
        fanout: Members = NO_MEMBERS,
    ) -> bool:
        """Store what this node read or wrote; False when it is stale and was dropped.

        `stamp` is `stamp()` taken before the query; `asked_at` the local time it was sent:
        counting the database's TTL from then makes the local deadline fall no later than the
        real expiry.
        """
        if stamp < self._resync_stamp:
            return False
        tomb = self._tombstones.get((pair[0].int, pair[1]))
        if tomb is not None and tomb[1] > stamp:
            return False
        s = self._slot_of(pair)
        if s >= 0 and version < self._version[s] and self._deadline[s] > self._clock():
            return False
        self._put(pair, backend, version, asked_at + ttl, asked_at, fanout, s)
        return True

    def load(self, rows: Iterable[RowTuple], stamp: int, asked_at: float) -> int:
        """Catch-up rows (and a page's sets): `fill` for each. A row whose TTL is spent (a
        catch-up returns changed rows that expired since) only removes what it replaced.
        Returns how many rows were stored."""
        if stamp < self._resync_stamp:
            return 0
        tombs, now, stored = self._tombstones, self._clock(), 0
        for key, model, backend, version, ttl, fanout in rows:
            self.seen(version)
            u = key.int
            if tombs and self._deleted_since(u, model, stamp):
                continue
            mid = self._model_ids.get(model)
            s = -1 if mid is None else self._find(u, mid)
            if s >= 0 and version < self._version[s] and self._deadline[s] > now:
                continue
            if ttl <= 0:
                if s >= 0:
                    self._drop(s)
                continue
            members = tuple(fanout) if fanout else NO_MEMBERS
            self._write(u, model, s, backend, version, asked_at + ttl, asked_at, members)
            stored += 1
        return stored

    def _deleted_since(self, u: int, model: str, stamp: int) -> bool:
        """The pair was deleted after the read began (the row is dropped); an older tombstone
        is forgotten (the row replaces it)."""
        tomb = self._tombstones.get((u, model))
        if tomb is None:
            return False
        if tomb[1] > stamp:
            return True
        del self._tombstones[(u, model)]
        return False

    def load_page(
        self, page: SnapshotPage, stamp: int, asked_at: float, start: int = 0, stop: int = -1
    ) -> int:
        """Rows [start, stop) of a snapshot page: `fill` for each, from the columns. A million
        rows come through here at start, so the common case (a plain binding whose model and
        backend are interned already, no size bound) is written inline: one probe finds the
        pair or the free cell it goes to. The rest (sets among them) takes `load`. Returns how
        many rows were stored."""
        if stamp < self._resync_stamp:
            return 0
        stored = 0
        stop = len(page.models) if stop < 0 else min(stop, len(page.models))
        sets = page.sets
        tombs, now, gen = self._tombstones, self._clock(), self._generation
        mids, bids = self._models.ids, self._backends.ids
        mrefs, brefs = self._models.refs, self._backends.refs
        salts, tables, masks, filled = self._salts, self._tables, self._masks, self._filled
        hi_a, lo_a, model_a, home_a = self._hi, self._lo, self._model, self._home
        backend_a, version_a, deadline_a = self._backend, self._version, self._deadline
        checked_a, gen_a, free, fanouts = self._checked, self._gen, self._free, self._fanout
        expiry, heap, bounded = self._expiry, self._expiry_heap, self._max > 0
        keys, versions, ttls = page.keys, page.versions, page.ttls
        added = 0
        models, backends = page.models, page.backends
        for n in range(start, stop):
            model, backend = models[n], backends[n]
            hi, lo, version, ttl = keys[2 * n], keys[2 * n + 1], versions[n], ttls[n]
            u = hi << 64 | lo
            if tombs and self._deleted_since(u, model, stamp):
                continue
            mid = mids.get(model)
            bid = bids.get(backend)
            if mid is None or bid is None or ttl <= 0 or bounded or (sets and (u, model) in sets):
                members = sets.get((u, model)) if sets else None
                stored += self.load(
                    [(UUID(int=u), model, backend, version, ttl, members)], stamp, asked_at
                )
                continue
            h = hash(u ^ salts[mid])
            shard = h & _SHARD_MASK
            table, mask = tables[shard], masks[shard]
            i = (h >> _SHARD_BITS) & mask
            while True:
                s = table[i] - 1
                if s < 0 or (lo_a[s] == lo and model_a[s] == mid and hi_a[s] == hi):
                    break
                i = (i + 1) & mask
            deadline = asked_at + ttl
            if s >= 0:
                if version < version_a[s] and deadline_a[s] > now:
                    continue
                if backend_a[s] != bid:
                    stored += self.load(
                        [(UUID(int=u), model, backend, version, ttl, None)], stamp, asked_at
                    )
                    continue
                if fanouts:
                    fanouts.pop(s, None)
                version_a[s] = version
                deadline_a[s] = deadline
                checked_a[s] = asked_at
                gen_a[s] = gen
            elif (filled[shard] + 1) * 2 > mask + 1:  # the table grows first
                stored += self.load(
                    [(UUID(int=u), model, backend, version, ttl, None)], stamp, asked_at
                )
                continue
            else:
                home = (h >> _SHARD_BITS) & _HOME_MASK
                if free:
                    s = free.pop()
                    hi_a[s], lo_a[s], model_a[s], home_a[s] = hi, lo, mid, home
                    backend_a[s], version_a[s], deadline_a[s] = bid, version, deadline
                    checked_a[s], gen_a[s] = asked_at, gen
                else:
                    s = len(model_a)
                    hi_a.append(hi)
                    lo_a.append(lo)
                    model_a.append(mid)
                    home_a.append(home)
                    backend_a.append(bid)
                    version_a.append(version)
                    deadline_a.append(deadline)
                    checked_a.append(asked_at)
                    gen_a.append(gen)
                table[i] = s + 1
                filled[shard] += 1
                added += 1
                mrefs[mid] += 1
                brefs[bid] += 1
            second = int(deadline) + 1
            bucket = expiry.get(second)
            if bucket is None:
                expiry[second] = array("i", (s,))
                heapq.heappush(heap, second)
            else:
                bucket.append(s)
            stored += 1
        self._count += added
        if start < stop:
            self.seen(max(versions[start:stop]))
        return stored

    def _newest_known(self, pair: Pair) -> int:
        s = self._slot_of(pair)
        if s >= 0:
            return self._version[s]
        tomb = self._tombstones.get((pair[0].int, pair[1]))
        return tomb[0] if tomb is not None else -1

    def apply_change(
        self, pair: Pair, backend: str, version: int, ttl: float, fanout: Members = NO_MEMBERS
    ) -> bool:
        """A notification of an insert, a move or a set change; `ttl` net of the lag."""
        s = self._slot_of(pair)
        if s >= 0:
            if version < self._version[s]:
                return False
        else:
            tomb = self._tombstones.get((pair[0].int, pair[1]))
            if tomb is not None and version < tomb[0]:
                return False
        self._stamp += 1
        now = self._clock()
        self._put(pair, backend, version, now + ttl, now, fanout, s)
        return True

    def apply_delete(self, pair: Pair, version: int) -> bool:
        if version < self._newest_known(pair):
            return False
        self._stamp += 1
        self.seen(version)
        s = self._slot_of(pair)
        if s >= 0:
            self._drop(s)
        self._tombstones[(pair[0].int, pair[1])] = (version, self._stamp)
        self._tombstones.move_to_end((pair[0].int, pair[1]))
        if len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)
        return True

    def invalidate(self, pair: Pair) -> None:
        """Forget a pair without claiming anything about it (an untrusted notification): the
        next request reads the row. Reads in flight stay valid (they come from the database)."""
        s = self._slot_of(pair)
        if s >= 0:
            self._drop(s)

    def extend(self, pair: Pair, backend: str, version: int, ttl: float, asked_at: float) -> None:
        """A refresh this node wrote: new deadline if the entry is still the same binding."""
        s = self._slot_of(pair)
        if (
            s >= 0
            and self._version[s] == version
            and self._backends.names[self._backend[s]] == backend
        ):
            self._deadline[s] = asked_at + ttl
            self._checked[s] = asked_at
            self._expire_at(s, asked_at + ttl)

    def evict(self, pair: Pair, backend: str | None = None) -> None:
        s = self._slot_of(pair)
        if s >= 0 and (backend is None or self._backends.names[self._backend[s]] == backend):
            self._drop(s)

    def sweep(self, now: float | None = None) -> int:
        """Remove entries past their deadline; returns how many. Cheap when nothing is due."""
        now = self._clock() if now is None else now
        heap, expiry, deadline, model = self._expiry_heap, self._expiry, self._deadline, self._model
        removed = 0
        while heap and heap[0] <= now:
            second = heapq.heappop(heap)
            for s in expiry.pop(second, ()):
                if model[s] != _FREE and deadline[s] <= now:
                    self._drop(s)
                    removed += 1
        if removed and self._on_evict is not None:
            self._on_evict("expired", removed)
        return removed

    # -- resync ------------------------------------------------------------------------------

    def begin_resync(self) -> None:
        """Called before a catch-up or a snapshot is read: older fills are void from here on,
        and what is written from now on belongs to the new generation."""
        self._stamp += 1
        self._resync_stamp = self._stamp
        self._generation += 1

    @property
    def slots(self) -> int:
        """Slots in use or free: the range `prune_unconfirmed` walks."""
        return len(self._model)

    def prune_unconfirmed(self, start: int, stop: int) -> int:
        """After a full snapshot: drop the entries in slots [start, stop) that nothing wrote
        since `begin_resync` (their rows are gone). Chunked, so the caller can yield."""
        gen, model, current = self._gen, self._model, self._generation
        removed = 0
        for s in range(start, min(stop, len(model))):
            if model[s] != _FREE and gen[s] != current:
                self._drop(s)
                removed += 1
        return removed

    def finish_resync(
        self, rows: Iterable[RowTuple], asked_at: float, version_now: int = 0
    ) -> None:
        """A whole snapshot at once (small tables, tests): the rows, then the prune."""
        self.load(rows, self._resync_stamp, asked_at)
        self.prune_unconfirmed(0, self.slots)
        self.seen(version_now)

    # -- reading everything (debug, gauges, the fan-out controller) ---------------------------

    def items(self) -> list[tuple[Pair, Entry]]:
        model = self._model
        return [(self._pair(s), self._entry(s)) for s in range(len(model)) if model[s] != _FREE]

    def sets(self) -> list[tuple[Pair, Entry]]:
        """The pairs served by more than one backend (a handful, even in a big table)."""
        return [(self._pair(s), self._entry(s)) for s in list(self._fanout)]

    def set_sizes(self) -> dict[int, int]:
        """How many cached pairs have a set of each size (1: a plain binding)."""
        sizes = {1: self._count - len(self._fanout)}
        for members in self._fanout.values():
            size = 1 + len(members)
            sizes[size] = sizes.get(size, 0) + 1
        return sizes
