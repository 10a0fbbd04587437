"""One contract, two stores: the cases every BindingStore must pass, run against the memory
store (the node-local mode and the unit tests' store) and the Postgres store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from affinity_node.app import database_pool, postgres_bindings
from affinity_node.config import DatabaseConfig
from affinity_node.routing.ports import BindingStore, Pair
from affinity_node.store.memory import MemoryBindingStore
from tests.support.nodes import new_key
from tests.support.waiting import wait_for

B1, B2, B3 = "http://b1:8000", "http://b2:8000", "http://b3:8000"


@pytest.fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[BindingStore]:
    if request.param == "memory":
        yield MemoryBindingStore()
        return
    db = DatabaseConfig(dsn=dsn, pool_max=4)
    async with database_pool(db, "contract") as pool:
        yield postgres_bindings(pool)


@pytest.fixture
async def pair(db: asyncpg.Connection) -> Pair:
    """A pair whose key exists (Postgres needs the api_keys row; memory does not care)."""
    return (await new_key(db), "llama")


class Chooser:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.backend


async def test_absent_pair_reads_none(store: BindingStore, pair: Pair) -> None:
    assert await store.read(pair) is None


async def test_create_if_absent_creates_once(store: BindingStore, pair: Pair) -> None:
    first = Chooser(B1)
    created = await store.create_if_absent(pair, first, 60.0)
    assert created.created and created.binding.backend == B1 and first.calls == 1
    assert 59.0 < created.binding.ttl <= 60.0
    second = Chooser(B2)
    again = await store.create_if_absent(pair, second, 60.0)
    assert not again.created and again.binding.backend == B1
    assert second.calls == 0  # the existing binding wins; nobody chose
    assert again.binding.version == created.binding.version
    read = await store.read(pair)
    assert read is not None and (read.backend, read.version) == (B1, created.binding.version)


async def test_rebind_is_compare_and_set(store: BindingStore, pair: Pair) -> None:
    created = (await store.create_if_absent(pair, Chooser(B1), 60.0)).binding
    assert await store.rebind(pair, B2, B3, 60.0) is None  # it does not point at B2
    moved = await store.rebind(pair, B1, B2, 60.0)
    assert moved is not None and moved.backend == B2 and moved.version > created.version
    assert await store.rebind(pair, B1, B3, 60.0) is None  # the old view lost
    read = await store.read(pair)
    assert read is not None and read.backend == B2


async def test_refresh_extends_only_bindings_that_still_point_there(
    store: BindingStore, pair: Pair
) -> None:
    created = (await store.create_if_absent(pair, Chooser(B1), 30.0)).binding
    assert await store.refresh([(pair, B2)], 300.0) == []
    rows = await store.refresh([(pair, B1)], 300.0)
    assert [(r.api_key_id, r.model, r.backend) for r in rows] == [(pair[0], pair[1], B1)]
    assert rows[0].version == created.version  # a TTL extension is not a routing change
    assert 299.0 < rows[0].ttl <= 300.0
    assert await store.refresh([], 300.0) == []


async def test_snapshot_pages_list_live_bindings_in_key_order_and_resume(
    store: BindingStore, db: asyncpg.Connection
) -> None:
    keys = [await new_key(db, f"k{i}") for i in range(5)]
    pairs = sorted((k, m) for k in keys for m in ("a", "b"))
    for i, p in enumerate(pairs):
        await store.create_if_absent(p, Chooser(B1 if i % 2 else B2), 60.0)
    pages, after = [], None
    while True:
        page = await store.snapshot_page(after, 3)
        pages.append(page)
        if page.rows < 3:
            break
        after = page.last
    assert [p.rows for p in pages] == [3, 3, 3, 1]
    assert [p.last for p in pages] == [pairs[2], pairs[5], pairs[8], pairs[9]]
    keys = [
        uuid.UUID(int=p.keys[2 * i] << 64 | p.keys[2 * i + 1]) for p in pages for i in range(p.rows)
    ]
    assert list(zip(keys, [m for p in pages for m in p.models], strict=True)) == pairs
    assert [b for p in pages for b in p.backends] == [B1 if i % 2 else B2 for i in range(10)]
    assert all(59.0 < t <= 60.0 for p in pages for t in p.ttls)
    assert all(not p.sets for p in pages)
    empty = await store.snapshot_page(None, 0)
    assert (empty.rows, empty.last) == (0, None)
    assert await store.estimate_bindings() >= 0


async def test_a_snapshot_page_holds_sets_as_rows(store: BindingStore, pair: Pair) -> None:
    created = (await store.create_if_absent(pair, Chooser(B1), 60.0)).binding
    grown = await store.set_members(pair, created.version, (B2, B3))
    assert grown is not None
    page = await store.snapshot_page(None, 10)
    assert (page.rows, page.last, list(page.backends)) == (1, pair, [B1])
    assert (page.versions[0], dict(page.sets)) == (
        grown.version,
        {(pair[0].int, pair[1]): (B2, B3)},
    )
    assert 59.0 < page.ttls[0] <= 60.0


async def test_changes_since_a_version_are_the_newer_rows(
    store: BindingStore, db: asyncpg.Connection
) -> None:
    first = (await new_key(db, "first"), "m")
    later = (await new_key(db, "later"), "m")
    v1 = (await store.create_if_absent(first, Chooser(B1), 60.0)).binding.version
    v2 = (await store.create_if_absent(later, Chooser(B1), 60.0)).binding.version
    moved = await store.rebind(first, B1, B2, 60.0)
    assert moved is not None
    changes = await store.changes_since(v2, 100)
    assert changes is not None and not changes.deleted
    assert [(r[0], r[1], r[2], r[3]) for r in changes.rows] == [(first[0], "m", B2, moved.version)]
    everything = await store.changes_since(v1 - 1, 100)
    assert everything is not None and len(everything.rows) == 2
    assert await store.changes_since(v1 - 1, 1) is None  # more than the limit: reload instead


async def test_expired_bindings_vanish_are_replaced_and_are_cleaned_up(
    store: BindingStore, pair: Pair
) -> None:
    old = (await store.create_if_absent(pair, Chooser(B1), 0.05)).binding
    await wait_for(lambda: _gone(store, pair), timeout=5.0, what="the binding to expire")
    assert (await store.snapshot_page(None, 10)).rows == 0
    assert await store.rebind(pair, B1, B2, 60.0) is None  # a move never revives it
    fresh = await store.create_if_absent(pair, Chooser(B3), 0.05)
    assert fresh.created and fresh.binding.backend == B3 and fresh.binding.version > old.version
    await wait_for(lambda: _gone(store, pair), timeout=5.0, what="the binding to expire")
    assert await store.delete_expired(100) == 1
    assert await store.delete_expired(100) == 0


async def _gone(store: BindingStore, pair: Pair) -> bool:
    return await store.read(pair) is None
