"""The binding cache's ordering rules, with a fake clock (no database needed for these)."""

from __future__ import annotations

import uuid

from affinity_node.routing.cache import BindingCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


K = uuid.uuid4()
P = (K, "m")


def test_older_versions_never_replace_newer():
    cache = BindingCache(clock=Clock())
    assert cache.apply_change(P, "b2", 5, 60)
    assert not cache.apply_change(P, "b1", 4, 60)
    assert not cache.fill(P, "b1", 3, 60, cache.stamp(), 1000.0)
    assert cache.get(P).backend == "b2"


def test_delete_tombstone_stops_a_late_fill_of_the_deleted_row():
    cache = BindingCache(clock=Clock())
    cache.apply_change(P, "b1", 5, 60)
    read_began = cache.stamp()  # a read of the row starts, then the delete is notified
    assert cache.apply_delete(P, 6)
    assert cache.get(P) is None
    assert not cache.fill(P, "b1", 5, 60, read_began, 1000.0)
    assert cache.get(P) is None
    assert cache.apply_change(P, "b2", 7, 60)  # re-created later: newer version wins
    assert cache.get(P).backend == "b2"


def test_fill_from_before_a_resync_is_discarded():
    cache = BindingCache(clock=Clock())
    read_began = cache.stamp()
    cache.begin_resync()
    cache.finish_resync([], 1000.0)
    assert not cache.fill(P, "b1", 1, 60, read_began, 1000.0)
    assert cache.fill(P, "b1", 1, 60, cache.stamp(), 1000.0)


def test_resync_keeps_changes_notified_during_the_snapshot_and_drops_vanished_rows():
    clock = Clock()
    cache = BindingCache(clock=clock)
    gone, moved = (uuid.uuid4(), "m"), (uuid.uuid4(), "m")
    cache.apply_change(gone, "b1", 1, 60)
    cache.apply_change(moved, "b1", 2, 60)
    cache.begin_resync()
    cache.apply_change(moved, "b3", 9, 60)  # arrives while the snapshot is read
    snapshot = [(moved[0], "m", "b2", 8, 30.0, None), (K, "m", "b1", 3, 30.0, None)]
    cache.finish_resync(snapshot, clock.now)
    assert cache.get(gone) is None
    assert cache.get(moved).backend == "b3"
    assert cache.get(P).backend == "b1" and cache.get(P).deadline == clock.now + 30.0


def test_size_is_bounded_and_the_entry_closest_to_expiry_goes_first():
    evicted = []
    cache = BindingCache(max_entries=3, clock=Clock(), on_evict=lambda r, n: evicted.append(r))
    pairs = [(uuid.uuid4(), "m") for _ in range(4)]
    for i, p in enumerate(pairs[:3]):
        cache.apply_change(p, "b", i, 60 + 10 * i)
    cache.extend(pairs[0], "b", 0, 500, 1000.0)  # used and refreshed: now the furthest
    cache.apply_change(pairs[3], "b", 10, 300)
    assert len(cache) == 3 and evicted == ["size"]
    assert cache.get(pairs[1]) is None
    assert cache.get(pairs[0]) is not None and cache.get(pairs[3]) is not None
    assert cache.bindings_of("b") == 3


def test_deadline_counts_from_when_the_query_was_sent():
    clock = Clock()
    cache = BindingCache(clock=clock)
    cache.fill(P, "b", 1, 10.0, cache.stamp(), asked_at=clock.now - 2)
    assert cache.get(P).deadline == clock.now + 8.0


def test_bindings_per_backend_follow_every_change():
    clock = Clock()
    cache = BindingCache(max_entries=3, clock=clock)
    pairs = [(uuid.uuid4(), "m") for _ in range(5)]

    def recount() -> dict[str, int]:
        counts: dict[str, int] = {}
        for _p, e in cache.items():
            counts[e.backend] = counts.get(e.backend, 0) + 1
        return counts

    cache.apply_change(pairs[0], "a", 1, 60)
    cache.apply_change(pairs[1], "a", 2, 60)
    cache.fill(pairs[2], "b", 3, 60, cache.stamp(), clock.now)
    assert cache.bindings_per_backend() == recount() == {"a": 2, "b": 1}
    cache.apply_change(pairs[1], "b", 4, 60)  # moved
    cache.apply_change(pairs[3], "c", 5, 60)  # evicts the least recently used
    assert cache.bindings_per_backend() == recount()
    cache.apply_delete(pairs[3], 6)
    cache.evict(pairs[2], "b")
    assert cache.bindings_per_backend() == recount()
    cache.begin_resync()
    cache.finish_resync([(pairs[4][0], "m", "d", 9, 30.0, None)], clock.now)
    assert cache.bindings_per_backend() == recount() == {"d": 1}
    assert cache.bindings_of("d") == 1 and cache.bindings_of("a") == 0


def test_a_read_that_began_after_a_delete_is_believed_whatever_the_delete_claimed():
    """A forged delete with a huge version must not keep the real row out of the cache."""
    cache = BindingCache(clock=Clock())
    assert cache.apply_delete(P, 9_000_000_000)
    assert cache.fill(P, "b1", 5, 60, cache.stamp(), 1000.0)
    assert cache.get(P).backend == "b1"


def test_invalidate_forgets_without_blocking_reads():
    cache = BindingCache(clock=Clock())
    cache.apply_change(P, "b1", 5, 60)
    read_began = cache.stamp()
    cache.invalidate(P)
    assert cache.get(P) is None and cache.bindings_of("b1") == 0
    assert cache.fill(P, "b1", 5, 60, read_began, 1000.0)


def test_sweep_removes_expired_entries_and_their_counts():
    clock = Clock()
    cache = BindingCache(clock=clock)
    short, long_ = (uuid.uuid4(), "m"), (uuid.uuid4(), "m")
    cache.apply_change(short, "b1", 1, 5.0)
    cache.apply_change(long_, "b1", 2, 50.0)
    cache.apply_change(P, "b2", 3, 5.0)
    cache.extend(P, "b2", 3, 50.0, clock.now)  # extended: not due any more
    assert cache.sweep() == 0
    clock.now += 6.0
    assert cache.sweep() == 1
    assert cache.get(short) is None and len(cache) == 2
    assert cache.bindings_per_backend() == {"b1": 1, "b2": 1}
    clock.now += 60.0
    assert cache.sweep() == 2 and len(cache) == 0 and cache.bindings_per_backend() == {}


def test_entries_remember_when_the_database_last_confirmed_them():
    clock = Clock()
    cache = BindingCache(clock=clock)
    cache.fill(P, "b1", 1, 60, cache.stamp(), asked_at=clock.now - 1)
    assert cache.get(P).checked == clock.now - 1
    clock.now += 10
    cache.extend(P, "b1", 1, 60, clock.now)
    assert cache.get(P).checked == clock.now
    clock.now += 10
    cache.apply_change(P, "b2", 2, 60)
    assert cache.get(P).checked == clock.now


def test_max_version_follows_rows_and_notifications():
    cache = BindingCache(clock=Clock())
    cache.apply_change(P, "b1", 7, 60)
    assert cache.max_version == 7
    cache.begin_resync()
    cache.finish_resync([(K, "x", "b1", 40, 30.0, None)], 1000.0, version_now=55)
    assert cache.max_version == 55
