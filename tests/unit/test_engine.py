"""The affinity engine on the memory store with a clock moved by hand: no Postgres, no sockets."""

from __future__ import annotations

import asyncio

from affinity_node.routing.engine import NoCandidates
from affinity_node.store.memory import MemoryBindingStore
from tests.support.waiting import wait_for
from tests.unit.fakes import (
    B1,
    B2,
    B3,
    KEY,
    MODEL,
    PAIR,
    Chooser,
    Clock,
    FlakyStore,
    GatedStore,
    make_engine,
    sample,
)

ALL = (B1, B2, B3)


async def test_miss_creates_then_hits_from_memory() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    engine, reg = make_engine(store, clock)
    choose = Chooser()
    first = await engine.resolve(KEY, MODEL, ALL, choose)
    assert (first.backend, first.outcome) == (B1, "created")
    calls = store.calls
    for _ in range(5):
        again = await engine.resolve(KEY, MODEL, ALL, choose)
        assert (again.backend, again.outcome) == (B1, "hit")
    assert store.calls == calls  # hits never reach the store
    assert choose.calls == 1
    assert sample(reg, "affinity_cache_hits_total", model=MODEL) == 5
    assert sample(reg, "affinity_cache_misses_total", model=MODEL, outcome="created") == 1


async def test_a_binding_made_elsewhere_is_found_in_the_store() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    other, _ = make_engine(store, clock)
    engine, reg = make_engine(store, clock)
    await other.resolve(KEY, MODEL, ALL, lambda c: B2)
    res = await engine.resolve(KEY, MODEL, ALL, Chooser())
    assert (res.backend, res.outcome) == (B2, "found_in_db")
    assert sample(reg, "affinity_cache_misses_total", model=MODEL, outcome="found_in_db") == 1


async def test_concurrent_misses_share_one_trip_and_one_choice() -> None:
    clock = Clock()
    store = GatedStore(clock)
    engine, reg = make_engine(store, clock)
    choose = Chooser()
    tasks = [asyncio.create_task(engine.resolve(KEY, MODEL, ALL, choose)) for _ in range(50)]
    for _ in range(5):  # let every caller reach the shared trip (no I/O: a few turns suffice)
        await asyncio.sleep(0)
    assert store.waiting == 1
    store.gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.backend for r in results} == {B1}
    assert store.waiting == 1  # one create for fifty callers
    assert choose.calls == 1
    outcomes = [r.outcome for r in results]
    assert outcomes.count("created") == 1 and outcomes.count("found_after_lock") == 49
    created = sample(reg, "affinity_cache_misses_total", model=MODEL, outcome="created")
    after = sample(reg, "affinity_cache_misses_total", model=MODEL, outcome="found_after_lock")
    assert (created, after) == (1, 49)


async def test_unhealthy_bound_backend_is_rebound_by_compare_and_set() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    engine, reg = make_engine(store, clock)
    await engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    before = await store.read(PAIR)
    assert before is not None
    res = await engine.resolve(KEY, MODEL, (B2, B3), lambda c: B3)  # B1 left the candidates
    assert (res.backend, res.outcome) == (B3, "rebind")
    after = await store.read(PAIR)
    assert after is not None and after.backend == B3 and after.version > before.version
    assert sample(reg, "affinity_rebinds_total", model=MODEL, reason="unhealthy") == 1
    hit = await engine.resolve(KEY, MODEL, (B2, B3), Chooser())
    assert (hit.backend, hit.outcome) == (B3, "hit")


async def test_a_rebind_that_loses_the_race_takes_the_winners_backend() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    a, _ = make_engine(store, clock)
    b, _ = make_engine(store, clock)
    await a.resolve(KEY, MODEL, ALL, lambda c: B1)
    await b.resolve(KEY, MODEL, ALL, Chooser())  # b caches B1 too
    await store.rebind(PAIR, B1, B2, 60.0)  # another node moved it; b has not heard yet
    res = await b.resolve(KEY, MODEL, (B2, B3), lambda c: B3)
    assert (res.backend, res.outcome) == (B2, "rebind")  # the CAS failed: b follows B2
    stored = await store.read(PAIR)
    assert stored is not None and stored.backend == B2


async def test_store_down_degrades_at_once_and_a_background_trial_closes_the_breaker() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    engine, reg = make_engine(store, clock, db_retry_after_s=1.0)
    store.down = True
    first = await engine.resolve(KEY, MODEL, ALL, Chooser())
    assert first.outcome == "degraded"
    calls = store.calls
    # Open: further misses degrade without asking the store, on the same pinned backend.
    for _ in range(10):
        again = await engine.resolve(KEY, MODEL, ALL, Chooser())
        assert (again.backend, again.outcome) == (first.backend, "degraded")
    assert store.calls == calls and store.pings == 0
    assert sample(reg, "affinity_db_up") == 0
    assert sample(reg, "affinity_db_errors_total", operation="read") == 1
    store.down = False
    clock.advance(1.0)
    # The pause is over: the next miss starts one trial in the background and does not wait.
    res = await engine.resolve(KEY, MODEL, ALL, lambda c: B2)
    assert res.outcome == "degraded"
    await wait_for(lambda: engine.store_available, what="the trial to close the breaker")
    assert store.pings == 1
    res = await engine.resolve(KEY, MODEL, ALL, lambda c: B2)
    assert (res.backend, res.outcome) == (B2, "created")
    assert sample(reg, "affinity_db_up") == 1


async def test_a_frozen_store_costs_one_hanging_trial_not_one_wait_per_miss() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    engine, _ = make_engine(store, clock, db_retry_after_s=1.0)
    store.down = True
    await engine.resolve(KEY, MODEL, ALL, Chooser())  # the first failure opens the breaker
    store.hang = asyncio.Event()
    clock.advance(1.0)
    for i in range(20):  # every miss meanwhile is answered at once, without the store
        res = await engine.resolve(KEY, f"m{i}", ALL, Chooser())
        assert res.outcome == "degraded"
    assert store.pings == 1  # one trial at a time, however many misses
    store.down = False
    store.hang.set()
    await wait_for(lambda: engine.store_available, what="the trial to close the breaker")


async def test_a_lost_listener_shows_as_database_down_even_when_every_request_hits() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    engine, reg = make_engine(store, clock)
    await engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert sample(reg, "affinity_db_up") == 1
    engine.listener_state(False)
    assert sample(reg, "affinity_db_up") == 0
    assert (await engine.resolve(KEY, MODEL, ALL, Chooser())).outcome == "hit"
    engine.listener_state(True)
    assert sample(reg, "affinity_db_up") == 1


async def test_expired_entry_is_reread_before_it_counts_as_a_miss() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    a, _ = make_engine(store, clock, ttl_seconds=10.0)
    b, reg = make_engine(store, clock, ttl_seconds=10.0)
    await b.resolve(KEY, MODEL, ALL, lambda c: B1)
    clock.advance(8.0)
    await store.refresh([(PAIR, B1)], 10.0)  # another node extended it; b's deadline stands
    clock.advance(3.0)  # past b's local deadline, not past the row's
    res = await b.resolve(KEY, MODEL, ALL, lambda c: B3)
    assert (res.backend, res.outcome) == (B1, "found_in_db")
    clock.advance(11.0)  # now truly expired everywhere: a new binding is made
    res = await a.resolve(KEY, MODEL, ALL, lambda c: B3)
    assert (res.backend, res.outcome) == (B3, "created")
    assert sample(reg, "affinity_cache_misses_total", model=MODEL, outcome="found_in_db") == 1


async def test_refresh_is_queued_only_when_half_the_ttl_is_spent() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    engine, _ = make_engine(store, clock, ttl_seconds=100.0)
    await engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    engine.served(KEY, MODEL, B1)
    assert await engine.flush_refreshes() == 0  # fresh: nothing to extend
    clock.advance(60.0)
    engine.served(KEY, MODEL, B2)  # not the bound backend: ignored
    assert await engine.flush_refreshes() == 0
    engine.served(KEY, MODEL, B1)
    assert await engine.flush_refreshes() == 1
    stored = await store.read(PAIR)
    assert stored is not None and stored.ttl == 100.0
    clock.advance(60.0)  # past the old deadline, within the extended one
    res = await engine.resolve(KEY, MODEL, ALL, Chooser())
    assert res.outcome == "hit"


async def test_a_hits_deadline_decides_the_refresh_and_a_refresh_since_is_seen() -> None:
    """The success of a hit passes the deadline its resolution read: fresh, nothing queued;
    half-spent, the cache is read again, so a refresh that landed meanwhile (a request of
    the same pair that finished first) is not written twice."""
    clock = Clock()
    store = FlakyStore(clock)
    engine, _ = make_engine(store, clock, ttl_seconds=100.0)
    await engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    hit = await engine.resolve(KEY, MODEL, ALL, Chooser())
    assert hit.outcome == "hit" and hit.deadline == clock() + 100.0
    engine.served(KEY, MODEL, B1, hit.deadline)
    assert await engine.flush_refreshes() == 0
    clock.advance(60.0)
    early = await engine.resolve(KEY, MODEL, ALL, Chooser())
    late = await engine.resolve(KEY, MODEL, ALL, Chooser())
    engine.served(KEY, MODEL, B1, early.deadline)
    assert await engine.flush_refreshes() == 1
    engine.served(KEY, MODEL, B1, late.deadline)  # read before that refresh: half-spent
    assert await engine.flush_refreshes() == 0


async def test_failover_moves_the_binding_to_the_backend_that_served() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    engine, reg = make_engine(store, clock)
    await engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    engine.failed_over(KEY, MODEL, B1, B2)
    await engine.stop()  # waits for the background move
    stored = await store.read(PAIR)
    assert stored is not None and stored.backend == B2
    assert sample(reg, "affinity_rebinds_total", model=MODEL, reason="failover") == 1
    res = await engine.resolve(KEY, MODEL, ALL, Chooser())
    assert (res.backend, res.outcome) == (B2, "hit")


async def test_no_candidates_is_an_error_not_a_binding() -> None:
    clock = Clock()
    engine, _ = make_engine(MemoryBindingStore(clock), clock)
    try:
        await engine.resolve(KEY, MODEL, (), Chooser())
    except NoCandidates:
        pass
    else:
        raise AssertionError("resolve with no candidates must raise NoCandidates")


async def test_cleanup_deletes_expired_rows_in_batches() -> None:
    clock = Clock()
    store = MemoryBindingStore(clock)
    engine, _ = make_engine(store, clock, ttl_seconds=5.0, cleanup_batch=2)
    for i in range(5):
        await store.create_if_absent((KEY, f"m{i}"), lambda: B1, 5.0)
    await store.create_if_absent((KEY, "live"), lambda: B1, 50.0)
    clock.advance(6.0)
    assert await engine.cleanup_expired() == 5
    assert [r.model for r in await store.snapshot(100)] == ["live"]
