"""One contract, two stores: the cases every BindingStore must pass, run against the memory
store (the node-local mode and the unit tests' store) and the Postgres store."""

from __future__ import annotations

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


async def test_snapshot_lists_live_bindings_up_to_the_limit(
    store: BindingStore, pair: Pair
) -> None:
    await store.create_if_absent(pair, Chooser(B1), 60.0)
    rows = await store.snapshot(10)
    assert [(r.api_key_id, r.model, r.backend) for r in rows] == [(pair[0], pair[1], B1)]
    assert await store.snapshot(0) == []


async def test_expired_bindings_vanish_are_replaced_and_are_cleaned_up(
    store: BindingStore, pair: Pair
) -> None:
    old = (await store.create_if_absent(pair, Chooser(B1), 0.05)).binding
    await wait_for(lambda: _gone(store, pair), timeout=5.0, what="the binding to expire")
    assert await store.snapshot(10) == []
    assert await store.rebind(pair, B1, B2, 60.0) is None  # a move never revives it
    fresh = await store.create_if_absent(pair, Chooser(B3), 0.05)
    assert fresh.created and fresh.binding.backend == B3 and fresh.binding.version > old.version
    await wait_for(lambda: _gone(store, pair), timeout=5.0, what="the binding to expire")
    assert await store.delete_expired(100) == 1
    assert await store.delete_expired(100) == 0


async def _gone(store: BindingStore, pair: Pair) -> bool:
    return await store.read(pair) is None
