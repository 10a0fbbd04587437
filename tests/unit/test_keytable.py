"""The packed key table: the same answers as a pair of dicts under any sequence of changes, and
what it costs a key in memory (measured with tracemalloc, through the cache's own snapshot)."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
import uuid

import pytest

from affinity_node.auth.keycache import KeyCache
from affinity_node.auth.keytable import KeyTable, KeyTableLoad
from affinity_node.auth.ports import KeyPage
from affinity_node.auth.secrets import hash_secret
from tests.unit.fakes import MemoryKeyStore


def _digest(i: int) -> bytes:
    return hashlib.sha256(b"k%d" % i).digest()


@pytest.mark.parametrize("seed", range(4))
def test_it_answers_as_two_dicts_do_through_adds_replacements_and_removals(seed: int) -> None:
    rng = random.Random(seed)
    table = KeyTable()
    ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(400)]
    ids += [uuid.UUID(int=i) for i in range(1, 100)]  # sequential ids must not cluster
    digests = [_digest(i) for i in range(400)]
    model: dict[uuid.UUID, bytes] = {}
    for step in range(12_000):
        key_id = rng.choice(ids)
        if rng.random() < 0.6:
            digest = rng.choice(digests)
            table.add(digest, key_id)
            model = {k: d for k, d in model.items() if d != digest and k != key_id}
            model[key_id] = digest
        else:
            assert table.remove(key_id) == (key_id in model)
            model.pop(key_id, None)
        if step % 600 == 0:
            assert len(table) == len(model)
            assert {k: table.digest_of(k) for k in ids} == {k: model.get(k) for k in ids}
            owner = {d: k for k, d in model.items()}
            assert {d: table.get(d) for d in digests} == {d: owner.get(d) for d in digests}


def test_removals_keep_every_run_reachable_when_homes_collide_and_wrap() -> None:
    """Digests sharing their low bits land in one run (wrapping past the last slot); removing
    from its middle must move the rest back, or later probes stop short."""
    table = KeyTable(capacity=8)  # 16 slots
    same_home = []
    i = 0
    while len(same_home) < 8:
        d = _digest(i)
        if int.from_bytes(d[:8], "little") & 15 in (14, 15):
            same_home.append(d)
        i += 1
    ids = [uuid.uuid4() for _ in same_home]
    for d, k in zip(same_home, ids, strict=True):
        table.add(d, k)
    for gone in (ids[1], ids[4], ids[0]):
        assert table.remove(gone)
    for d, k in zip(same_home, ids, strict=True):
        gone = k in (ids[0], ids[1], ids[4])
        assert table.get(d) == (None if gone else k)
    assert len(table) == 5


def test_a_packed_page_loads_in_order_and_a_bad_one_is_refused() -> None:
    ids = sorted(uuid.uuid4() for _ in range(50))
    table = KeyTable()
    table.add_packed(b"".join(_digest(i) for i in range(50)), b"".join(k.bytes for k in ids))
    assert [table.get(_digest(i)) for i in range(50)] == ids
    with pytest.raises(ValueError, match="packed page"):
        table.add_packed(_digest(0), ids[0].bytes + b"x")
    assert table.get(b"short") is None


def test_a_snapshot_load_indexes_once_keeps_the_newer_of_a_repeated_digest_and_wants_order() -> (
    None
):
    """A key deleted and re-created with the same secret between two pages shows up twice:
    the later row (the newer id's page) wins. Pages out of id order are a store bug: refused."""
    ids = sorted(uuid.uuid4() for _ in range(6))
    load = KeyTableLoad()
    load.add_page(b"".join(_digest(i) for i in (0, 1, 2)), b"".join(k.bytes for k in ids[:3]))
    load.add_page(b"".join(_digest(i) for i in (3, 1, 5)), b"".join(k.bytes for k in ids[3:]))
    with pytest.raises(ValueError, match="ascending id order"):
        load.add_page(_digest(9), ids[0].bytes)
    table = load.table()
    assert len(table) == 5
    assert table.get(_digest(1)) == ids[4]
    assert ids[1] not in table and ids[4] in table
    assert [table.get(_digest(i)) for i in (0, 2, 3, 5)] == [ids[0], ids[2], ids[3], ids[5]]


class _PagedKeys(MemoryKeyStore):
    """Its snapshot pages packed beforehand, so what is measured is the cache, not the store."""

    def __init__(self, n: int, page: int) -> None:
        super().__init__()
        rng = random.Random(7)
        ids = sorted(uuid.UUID(int=rng.getrandbits(128)) for _ in range(n))
        self.pages = [
            KeyPage(
                b"".join(hash_secret(f"sk-{i}") for i in range(start, min(n, start + page))),
                b"".join(k.bytes for k in ids[start : start + page]),
            )
            for start in range(0, n, page)
        ]
        self.last_id = ids[-1]

    async def active_page(self, after: uuid.UUID, limit: int) -> KeyPage:
        return next((p for p in self.pages if p.last and p.last > after), KeyPage(b"", b""))


async def test_a_cached_key_costs_under_100_bytes_at_100000_keys() -> None:
    """The issue's figure, measured (not timed): Python allocations held by the cache after
    its snapshot, per key, and the peak while loading (no object per key even transiently).
    A dict each way cost ~435 bytes a key."""
    n = 100_000
    store = _PagedKeys(n, page=20_000)
    cache = KeyCache(store, page=20_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await cache.resync()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    per_key, peak_per_key = (held - before) / n, (peak - before) / n
    print(f"key cache at {n:,} keys: {per_key:.1f} B/key held, {peak_per_key:.1f} at peak")
    assert len(cache) == n
    assert await cache.authenticate(f"sk-{n - 1}") == store.last_id
    assert per_key < 100
    assert peak_per_key < 200  # the table and one page's slices: nothing per key
