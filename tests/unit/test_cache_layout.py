"""The compact cache's storage against a plain dict: the open-addressing tables (growth,
deletion by backward shift, slot reuse), the interned ids, snapshot pages, pruning, the size
bound. The ordering rules themselves are in test_cache.py."""

from __future__ import annotations

import random
import uuid

from affinity_node.routing.cache import BindingCache
from affinity_node.routing.ports import Pair, SnapshotPage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def snapshot_of(cache: BindingCache) -> dict[Pair, tuple[str, int, tuple[str, ...]]]:
    return {p: (e.backend, e.version, e.fanout) for p, e in cache.items()}


def test_random_changes_match_a_dict_through_growth_deletes_and_reuse():
    rng = random.Random(16)
    clock = Clock()
    cache = BindingCache(clock=clock)
    keys = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(3000)]
    models = [f"model-{i}" for i in range(7)]
    backends = [f"http://b{i}:8000" for i in range(5)]
    ref: dict[Pair, tuple[str, int, tuple[str, ...]]] = {}
    version = 0
    for step in range(40_000):
        pair = (rng.choice(keys), rng.choice(models))
        roll = rng.random()
        version += 1
        if roll < 0.55:
            fanout = tuple(rng.sample(backends, rng.randrange(0, 3))) if roll < 0.05 else ()
            backend = rng.choice(backends)
            assert cache.apply_change(pair, backend, version, 600.0, fanout)
            ref[pair] = (backend, version, fanout)
        elif roll < 0.8:
            assert cache.apply_delete(pair, version)
            ref.pop(pair, None)
        elif roll < 0.9:
            cache.invalidate(pair)
            ref.pop(pair, None)
        else:
            cache.evict(pair)
            ref.pop(pair, None)
        if step % 5000 == 0:
            assert snapshot_of(cache) == ref
    assert len(cache) == len(ref)
    assert snapshot_of(cache) == ref
    for pair in {(k, m) for k in keys for m in models}:  # through the tables, not the slots
        entry, want = cache.get(pair), ref.get(pair)
        assert (entry is None) == (want is None)
        if entry is not None and want is not None:
            assert (entry.backend, entry.version, entry.fanout) == want
    per_backend: dict[str, int] = {}
    for backend, _v, _f in ref.values():
        per_backend[backend] = per_backend.get(backend, 0) + 1
    assert cache.bindings_per_backend() == per_backend
    sets = {p for p, v in ref.items() if v[2]}
    assert {p for p, _e in cache.sets()} == sets
    assert cache.set_sizes()[1] == len(ref) - len(sets)
    # Emptied, every slot and id is free again; refilled, nothing grows.
    for pair in list(ref):
        cache.invalidate(pair)
    assert len(cache) == 0 and cache.bindings_per_backend() == {}
    slots = cache.slots
    for i, pair in enumerate(list(ref)[:1000]):
        cache.apply_change(pair, backends[0], version + i + 1, 600.0)
    assert cache.slots == slots and len(cache) == min(1000, len(ref))


def test_model_names_are_interned_and_released():
    cache = BindingCache(clock=Clock())
    key = uuid.uuid4()
    for i in range(200_000):  # far more distinct names than ids: each is released in turn
        pair = (key, f"m{i}")
        cache.apply_change(pair, "b", i + 1, 60.0)
        cache.invalidate(pair)
    cache.apply_change((key, "kept"), "b", 10**6, 60.0)
    assert cache.get((key, "kept")) is not None and len(cache) == 1


def test_snapshot_pages_obey_tombstones_versions_and_prune_what_they_did_not_see():
    clock = Clock()
    cache = BindingCache(clock=clock)
    old, moved, deleted, fresh = ((uuid.uuid4(), "m") for _ in range(4))
    cache.apply_change(old, "b1", 1, 60)  # its row is gone: the reload drops it
    cache.apply_change(moved, "b1", 2, 60)
    cache.begin_resync()
    stamp = cache.stamp()  # page read begins, then two notifications arrive
    cache.apply_change(moved, "b3", 9, 60)
    cache.apply_delete(deleted, 10)
    page = [
        (moved[0], "m", "b2", 8, 30.0, None),  # older than the notified move
        (deleted[0], "m", "b1", 7, 30.0, None),  # deleted after the page was read
        (fresh[0], "m", "b4", 5, 30.0, ["b5"]),
    ]
    assert cache.load_page(SnapshotPage.of(page), stamp, clock.now) == 1
    assert cache.prune_unconfirmed(0, cache.slots) == 1
    assert cache.get(old) is None and cache.get(deleted) is None
    assert cache.get(moved).backend == "b3"
    got = cache.get(fresh)
    assert (got.backend, got.fanout, got.deadline) == ("b4", ("b5",), clock.now + 30.0)
    assert cache.max_version == 10


def test_a_page_read_before_a_resync_began_is_dropped():
    cache = BindingCache(clock=Clock())
    stamp = cache.stamp()
    cache.begin_resync()
    page = SnapshotPage.of([(uuid.uuid4(), "m", "b", 1, 30.0, None)])
    assert cache.load_page(page, stamp, 1000.0) == 0
    assert len(cache) == 0


def test_a_changed_row_that_expired_since_only_removes_what_it_replaced():
    cache = BindingCache(clock=Clock())
    pair, newer = (uuid.uuid4(), "m"), (uuid.uuid4(), "m")
    cache.apply_change(pair, "b1", 3, 60)
    cache.apply_change(newer, "b1", 20, 60)
    rows = [(pair[0], "m", "b2", 5, -1.0, None), (newer[0], "m", "b2", 6, -1.0, None)]
    assert cache.load(rows, cache.stamp(), 1000.0) == 0
    assert cache.get(pair) is None  # version 3 replaced by 5, which has expired
    assert cache.get(newer).version == 20  # the cache knows better than the row


def test_the_size_bound_keeps_the_longest_lived_and_counts_what_it_evicts():
    clock = Clock()
    evicted: list[tuple[str, int]] = []
    cache = BindingCache(max_entries=100, clock=clock, on_evict=lambda r, n: evicted.append((r, n)))
    rows = [(uuid.uuid4(), "m", "b", i + 1, 10.0 + i, None) for i in range(1000)]
    cache.begin_resync()
    cache.load_page(SnapshotPage.of(rows), cache.stamp(), clock.now)
    assert len(cache) == 100
    assert sum(n for r, n in evicted if r == "size") == 900
    assert min(e.deadline for _p, e in cache.items()) >= clock.now + 10.0 + 900
    clock.now += 2000
    assert cache.sweep() == 100 and evicted[-1] == ("expired", 100)


def test_an_entry_costs_well_under_a_hundred_bytes_of_arrays():
    cache = BindingCache(clock=Clock())
    rows = [(uuid.uuid4(), f"m{i % 5}", f"b{i % 8}", i + 1, 600.0, None) for i in range(100_000)]
    cache.load_page(SnapshotPage.of(rows), cache.stamp(), 1000.0)
    assert len(cache) == 100_000
    assert cache.nbytes() / len(cache) < 100


def test_loading_pages_stores_what_filling_row_by_row_stores():
    """`load_page`'s inlined common case against `fill`, on pages that add, move, re-set,
    expire and re-deliver pairs (the same cache state must come out)."""
    rng = random.Random(5)
    clock = Clock()
    paged, filled = BindingCache(clock=clock), BindingCache(clock=clock)
    keys = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(400)]
    version = 0
    for _page in range(30):
        rows = []
        for _ in range(300):
            version += 1
            fanout = ["http://b9:1"] if rng.random() < 0.05 else None
            ttl = -1.0 if rng.random() < 0.05 else rng.uniform(10, 600)
            stale = rng.random() < 0.1  # an older version than the cache may hold
            rows.append(
                (
                    rng.choice(keys),
                    rng.choice(("m1", "m2", f"m{rng.randrange(30)}")),
                    f"http://b{rng.randrange(4)}:1",
                    version - 200 if stale else version,
                    ttl,
                    fanout,
                )
            )
        unique = list({(r[0], r[1]): r for r in rows}.values())  # a page holds a pair once
        page = SnapshotPage.of(unique)
        stamp = paged.stamp()
        for start in range(0, len(page.models), 64):  # in parts, as the engine does
            paged.load_page(page, stamp, clock.now, start, start + 64)
        for k, m, b, v, ttl, f in unique:
            s = filled._slot_of((k, m))
            if ttl <= 0:
                newer = s >= 0 and v < filled._version[s] and filled._deadline[s] > clock.now
                if s >= 0 and not newer:
                    filled.invalidate((k, m))
                continue
            filled.fill((k, m), b, v, ttl, filled.stamp(), clock.now, tuple(f) if f else ())
        clock.now += 5.0
        assert {p: (e.backend, e.version, e.deadline, e.fanout) for p, e in paged.items()} == {
            p: (e.backend, e.version, e.deadline, e.fanout) for p, e in filled.items()
        }
        assert paged.bindings_per_backend() == filled.bindings_per_backend()
