"""Resync on the memory store with a clock moved by hand: the node serves while a snapshot
loads in pages, a reload re-reads what it has not confirmed yet, a reconnect catches up from
the watermark, evictions are counted."""

from __future__ import annotations

import asyncio
from uuid import UUID

from affinity_node.routing.ports import BindingEvent, Pair, RowTuple
from affinity_node.store.memory import MemoryBindingStore
from tests.support.waiting import wait_for
from tests.unit.fakes import B1, B2, B3, MODEL, Chooser, Clock, make_engine, sample

ALL = (B1, B2, B3)


def key(i: int) -> UUID:
    return UUID(int=i)  # snapshot pages come in key order: 1, 2, 3, ...


class PagedStore(MemoryBindingStore):
    """Holds every snapshot page after the first until `gate` is set."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()
        self.pages = 0

    async def snapshot_page(self, after: Pair | None, limit: int) -> list[RowTuple]:
        self.pages += 1
        if self.pages > 1:
            await self.gate.wait()
        return await super().snapshot_page(after, limit)


async def bind(store: MemoryBindingStore, *ids: int, backend: str = B2) -> None:
    for i in ids:
        await store.create_if_absent((key(i), MODEL), lambda: backend, 600.0)


async def test_the_node_serves_while_its_snapshot_loads_in_pages() -> None:
    clock = Clock()
    store = PagedStore(clock)
    await bind(store, *range(1, 11))
    engine, reg = make_engine(store, clock, snapshot_page_rows=4)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.loaded == 4, what="the first page")
    status = engine.sync_status
    assert (status.state, status.mode, status.expected) == ("loading", "full", 10)
    loaded = await engine.resolve(key(1), MODEL, ALL, Chooser())
    assert (loaded.backend, loaded.outcome) == (B2, "hit")
    later = await engine.resolve(key(9), MODEL, ALL, Chooser())
    assert (later.backend, later.outcome) == (B2, "found_in_db")  # read like a miss
    store.gate.set()
    await wait_for(lambda: engine.sync_status.state == "done", what="the snapshot")
    assert (engine.sync_status.loaded, engine.sync_status.rows_read) == (10, 10)
    assert (await engine.resolve(key(10), MODEL, ALL, Chooser())).outcome == "hit"
    assert sample(reg, "affinity_cache_resync_rows_total", mode="full") == 10
    assert sample(reg, "affinity_cache_resyncs_total") == 1


async def test_a_reload_rereads_old_entries_before_use_until_it_confirms_them() -> None:
    clock = Clock()
    store = PagedStore(clock)
    store.gate.set()
    await bind(store, 1, 2, 3, 4)
    engine, _ = make_engine(store, clock, snapshot_page_rows=2, catchup_max_rows=0)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.state == "done", what="the first snapshot")
    engine.listener_state(False)
    clock.advance(1.0)
    await store.rebind((key(3), MODEL), B2, B3, 600.0)  # the node never hears of it
    store.gate.clear()
    store.pages = 0
    await engine.resync()  # too much changed for a catch-up (limit 0): a reload
    engine.listener_state(True)
    await wait_for(lambda: engine.sync_status.loaded == 2, what="the first page")
    confirmed = await engine.resolve(key(1), MODEL, ALL, Chooser())
    assert confirmed.outcome == "hit"
    stale = await engine.resolve(key(3), MODEL, ALL, Chooser())
    assert (stale.backend, stale.outcome) == (B3, "found_in_db")  # not the stale hit on B2
    store.gate.set()
    await wait_for(lambda: engine.sync_status.state == "done", what="the reload")
    assert (await engine.resolve(key(4), MODEL, ALL, Chooser())).outcome == "hit"


async def test_a_reconnect_catches_up_from_the_watermark() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    await bind(store, 1, 2, 3)
    engine, reg = make_engine(store, clock)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.state == "done", what="the snapshot")
    engine.advance_watermark(await store.version_now())  # as the listener proves it
    engine.listener_state(False)
    await store.rebind((key(1), MODEL), B2, B1, 600.0)
    await bind(store, 4, backend=B3)
    await engine.resync()
    status = engine.sync_status
    assert (status.state, status.mode, status.rows_read) == ("done", "incremental", 2)
    assert engine.cache.get((key(1), MODEL)).backend == B1
    assert engine.cache.get((key(4), MODEL)).backend == B3
    assert sample(reg, "affinity_cache_resync_rows_total", mode="incremental") == 2


async def test_live_bindings_evicted_for_size_are_counted() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    await bind(store, *range(1, 6))
    engine, reg = make_engine(store, clock, max_entries=2)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.state == "done", what="the snapshot")
    assert len(engine.cache) == 2
    assert sample(reg, "affinity_cache_evictions_total", reason="size") == 3
    clock.advance(700.0)
    engine.cache.sweep()
    assert sample(reg, "affinity_cache_evictions_total", reason="expired") == 2


class RestartingStore(MemoryBindingStore):
    """A database whose server start time the test changes (a restart or a failover)."""

    started_at = 1.0

    async def server_started_at(self) -> float:
        return self.started_at


async def test_a_database_that_restarted_or_went_back_in_time_is_reloaded_in_full() -> None:
    clock = Clock()
    store = RestartingStore(clock)
    await bind(store, 1, 2)
    engine, _ = make_engine(store, clock)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.state == "done", what="the snapshot")
    engine.advance_watermark(await store.version_now())
    await engine.resync()
    assert engine.sync_status.mode == "incremental"  # same server, nothing lost
    store.started_at = 2.0  # restarted (or another server took over)
    await engine.resync()
    assert engine.sync_status.mode == "full"
    await wait_for(lambda: engine.sync_status.state == "done", what="the reload")
    engine.advance_watermark(10**9)  # more than the table ever handed out: restored from backup
    await engine.resync()
    assert (engine.sync_status.mode, engine.watermark) == ("full", 0)


async def test_a_doorbell_too_large_to_read_while_the_snapshot_loads_is_not_lost() -> None:
    """Changes to pairs a loading snapshot has already read reach the cache only through
    doorbells. One whose read is over `doorbell_max_rows` cannot be read then: the node loads
    the snapshot once more when this one ends, rather than dropping the doorbell."""
    clock = Clock()
    store = PagedStore(clock)
    await bind(store, *range(1, 11))
    engine, _ = make_engine(store, clock, snapshot_page_rows=4, doorbell_max_rows=1)
    await engine.resync()
    await wait_for(lambda: engine.sync_status.loaded == 4, what="the first page")
    for i in (2, 3):  # both already read, as on B2
        moved = await store.rebind((key(i), MODEL), B2, B3, 600.0)
        assert moved is not None
        engine.doorbell(BindingEvent("update", (key(i), MODEL), B3, moved.version, 600.0, clock()))
    await wait_for(lambda: not engine.doorbells_pending, what="the doorbells' read")
    store.gate.set()

    def moved_in_the_cache() -> bool:
        entries = [engine.cache.get((key(i), MODEL)) for i in (2, 3)]
        return engine.sync_status.state == "done" and all(
            e is not None and e.backend == B3 for e in entries
        )

    await wait_for(moved_in_the_cache, what="the moved bindings, once the snapshots end")
    for i in (2, 3):
        res = await engine.resolve(key(i), MODEL, ALL, Chooser())
        assert (res.backend, res.outcome) == (B3, "hit")
