"""Backends joining, draining and leaving: the registry applied to a pool, the mover's drain
and rebalance (paced by a slot, as the database paces the fleet), DNS discovery with a fake
resolver. The memory store and a hand-moved clock; no Postgres, no sockets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.lifecycle import Mover, MoverRules, apply_registry, apply_static
from affinity_node.routing.load_view import LoadView
from affinity_node.routing.ports import BindingRow, RegistryEntry
from affinity_node.routing.router import AffinityRules, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.memory import MemoryBindingStore
from affinity_node.upstream.discovery import DnsDiscovery, DnsEntry
from tests.unit.fakes import B1, B2, B3, MODEL, Clock, make_engine, sample

ALL = (B1, B2, B3)


def pool(*urls: str) -> BackendPool:
    return BackendPool([BackendSpec(u, models=[MODEL]) for u in urls], [ModelSpec(MODEL)])


class SlotStore:
    """The mover's view of the table, over the memory store; one move slot per interval of a
    clock the test moves (as the database's one-row pacing does for the fleet)."""

    def __init__(self, store: MemoryBindingStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.last = -1e9
        self.slots = 0

    async def take_move_slot(self, min_interval_s: float) -> bool:
        if self.clock() - self.last < min_interval_s:
            return False
        self.last = self.clock()
        self.slots += 1
        return True

    async def _rows(self) -> list[BindingRow]:
        return await self.store.snapshot(10**6)

    async def on_backends(self, urls: Sequence[str], limit: int) -> list[BindingRow]:
        rows = [r for r in await self._rows() if r.backend in urls or set(r.fanout) & set(urls)]
        return rows[:limit]

    async def idle_bindings(self, url: str, limit: int) -> list[BindingRow]:
        rows = [r for r in await self._rows() if r.backend == url and not r.fanout]
        return sorted(rows, key=lambda r: r.ttl)[:limit]


def test_the_registry_adds_sets_states_and_removes_what_it_added() -> None:
    p = pool(B1, B2)
    entries = [
        RegistryEntry(B3, True, "vllm", (MODEL,), "active"),
        RegistryEntry(B2, False, "vllm", (), "draining"),
    ]
    changes = apply_registry(p, entries)
    assert {b.id for b in p.backends} == set(ALL)
    assert p.get(B3).origin == "registry" and p.get(B2).state == "draining"  # type: ignore[union-attr]
    assert set(changes) == {f"{B3} added", f"{B2} draining"}
    apply_registry(p, [RegistryEntry(B1, False, "vllm", (), "disabled")])
    assert p.get(B3) is None  # removed from the registry: gone
    assert p.get(B2).state == "active"  # type: ignore[union-attr]  # no row: back to active
    assert [b.id for b in p.candidates(MODEL)] == [B2]  # disabled serves nothing


def test_a_registry_row_of_a_kind_this_node_does_not_know_is_skipped_not_fatal() -> None:
    """Mid-upgrade, a newer node may add a backend of a kind older nodes lack (as llamacpp was):
    they leave that row out and still apply the others."""
    p = pool(B1, B2)
    entries = [
        RegistryEntry(B3, True, "sglang", (MODEL,), "active"),  # type: ignore[arg-type]
        RegistryEntry(B2, False, "vllm", (), "draining"),
    ]
    assert apply_registry(p, entries) == [f"{B2} draining"]
    assert p.get(B3) is None and p.get(B2).state == "draining"  # type: ignore[union-attr]


async def test_no_new_binding_lands_on_a_draining_backend() -> None:
    clock = Clock()
    p = pool(*ALL)
    p.set_state(p.get(B2), "draining")  # type: ignore[arg-type]
    engine, _ = make_engine(MemoryBindingStore(clock), clock)
    router = Router(
        p,
        make_strategy("round_robin"),
        engine,
        AffinityRules(),
        AffinityMetrics(CollectorRegistry()),
        BackendHealth(p),
    )
    chosen = {
        (await router.route(uuid.uuid4(), MODEL, affinity_path=True)).backend.id for _ in range(30)
    }
    assert chosen == {B1, B3}


async def test_the_mover_drains_at_its_pace_to_the_least_bound_backends() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(*ALL)
    engine, reg = make_engine(store, clock)
    keys = [uuid.uuid4() for _ in range(6)]
    for k in keys:
        await engine.resolve(k, MODEL, ALL, lambda c: B1)
    p.set_state(p.get(B1), "draining")  # type: ignore[arg-type]
    slots = SlotStore(store, clock)
    mover = Mover(engine, p, slots, MoverRules(drain_moves_per_s=2.0), clock)
    assert await mover.tick() == "drain"
    assert await mover.tick() is None  # the slot is taken for half a second
    for _ in range(10):
        clock.advance(0.5)
        await mover.tick()
    rows = await store.snapshot(100)
    assert {r.backend for r in rows} <= {B2, B3} and len(rows) == 6
    assert abs(engine.cache.bindings_of(B2) - engine.cache.bindings_of(B3)) <= 1
    assert sample(reg, "affinity_moves_total", reason="drain") == 6
    assert sample(reg, "affinity_rebinds_total", model=MODEL, reason="drain") == 6
    clock.advance(0.5)
    assert await mover.tick() is None  # nothing left to move


async def test_a_deadline_speeds_the_drain_up() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(*ALL)
    engine, _ = make_engine(store, clock)
    for _ in range(9):
        await engine.resolve(uuid.uuid4(), MODEL, ALL, lambda c: B1)
    b1 = p.get(B1)
    assert b1 is not None
    p.set_state(b1, "draining")
    mover = Mover(engine, p, SlotStore(store, clock), MoverRules(drain_moves_per_s=0.1), clock)
    assert mover.drain_interval([b1]) == 10.0
    b1.drain_deadline = datetime.now(UTC) + timedelta(seconds=20)
    assert 1.5 < mover.drain_interval([b1]) <= 2.0  # 9 bindings in 20 s


async def test_a_draining_set_member_leaves_the_set_and_a_first_member_hands_over() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(*ALL)
    engine, _ = make_engine(store, clock)
    a, b = uuid.uuid4(), uuid.uuid4()
    ra = await engine.resolve(a, MODEL, ALL, lambda c: B1)
    await engine.set_members((a, MODEL), ra.version, (B2,), "grow", "hot")
    rb = await engine.resolve(b, MODEL, ALL, lambda c: B3)
    await engine.set_members((b, MODEL), rb.version, (B1,), "grow", "hot")
    p.set_state(p.get(B1), "draining")  # type: ignore[arg-type]
    mover = Mover(engine, p, SlotStore(store, clock), MoverRules(), clock)
    for _ in range(4):
        await mover.tick()
        clock.advance(1.0)
    ra2, rb2 = await store.read((a, MODEL)), await store.read((b, MODEL))
    assert ra2 is not None and (ra2.backend, ra2.fanout) == (B2, ())  # its member took over
    assert rb2 is not None and (rb2.backend, rb2.fanout) == (B3, ())  # B1 left the set


async def test_rebalance_moves_idle_bindings_until_the_skew_is_gone_and_stops() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2)
    engine, reg = make_engine(store, clock)
    for _ in range(12):
        await engine.resolve(uuid.uuid4(), MODEL, (B1, B2), lambda c: B1)
    p.add(BackendSpec(B3, "vllm", (MODEL,)), "registry")  # a new, empty backend
    rules = MoverRules(rebalance_moves_per_minute=60.0, rebalance_after_s=10.0)
    mover = Mover(engine, p, SlotStore(store, clock), rules, clock)
    assert await mover.tick() is None  # skewed, but not for long enough
    moves = 0
    for _ in range(60):
        clock.advance(1.0)
        moves += (await mover.tick()) == "rebalance"
    counts = sorted(engine.cache.bindings_of(u) for u in (B1, B2, B3))
    assert counts[-1] <= 1.25 * 4 + 1 and sum(counts) == 12
    assert moves == sample(reg, "affinity_moves_total", reason="rebalance") > 0
    for _ in range(30):  # balanced: it stops
        clock.advance(1.0)
        assert await mover.tick() is None


async def test_rebalance_starts_at_the_threshold_and_settles_at_half_of_it() -> None:
    """Hysteresis: a skew under the threshold moves nothing; once moving, an added backend is
    filled to within half the threshold's excess of the mean, not just to its edge."""
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2, B3)
    engine, _reg = make_engine(store, clock)
    spread = [B1] * 11 + [B2] * 10 + [B3] * 9  # 1.1x the mean: under the 1.25 threshold
    for target in spread:
        await engine.resolve(uuid.uuid4(), MODEL, (B1, B2, B3), lambda c, t=target: t)
    rules = MoverRules(rebalance_moves_per_minute=600.0, rebalance_after_s=1.0)
    mover = Mover(engine, p, SlotStore(store, clock), rules, clock)
    for _ in range(10):
        clock.advance(1.0)
        assert await mover.tick() is None
    b4 = "http://10.0.0.4:8000"
    p.add(BackendSpec(b4, "vllm", (MODEL,)), "registry")
    for _ in range(60):
        clock.advance(1.0)
        await mover.tick()
    counts = {u: engine.cache.bindings_of(u) for u in (B1, B2, B3, b4)}
    mean = 30 / 4
    assert counts[b4] >= mean / 1.125 and max(counts.values()) <= 1.125 * mean + 1, counts
    assert sum(counts.values()) == 30


async def test_dns_discovery_adds_drains_and_removes_backends() -> None:
    answers = {"vllm.svc": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(name: str, port: int) -> list[str]:
        if name not in answers:
            raise OSError("NXDOMAIN")
        return answers[name]

    p = BackendPool([], [ModelSpec(MODEL)])
    busy: set[str] = set()
    discovery = DnsDiscovery(
        p,
        [DnsEntry("vllm.svc", 8000, models=(MODEL,))],
        resolver,
        is_idle=lambda b: b.id not in busy,
    )
    await discovery.resolve_once()
    assert [b.id for b in p.backends] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert all(b.origin == "dns" for b in p.backends)
    answers["vllm.svc"] = ["10.0.0.2", "10.0.0.3"]
    busy.add("http://10.0.0.1:8000")  # still holds bindings: drains first
    await discovery.resolve_once()
    gone = p.get("http://10.0.0.1:8000")
    assert gone is not None and gone.state == "draining"
    assert p.get("http://10.0.0.3:8000") is not None
    del answers["vllm.svc"]  # a failed resolution changes nothing
    await discovery.resolve_once()
    assert len(p.backends) == 3
    answers["vllm.svc"] = ["10.0.0.2", "10.0.0.3"]
    busy.clear()
    await discovery.resolve_once()
    assert [b.id for b in p.backends] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]


def test_a_reloaded_static_list_adds_and_removes_only_config_backends() -> None:
    removed: list[str] = []
    pool = BackendPool(
        [BackendSpec(B1, models=(MODEL,)), BackendSpec(B2, models=(MODEL,))],
        on_remove=lambda b: removed.append(b.id),
    )
    pool.add(BackendSpec("http://10.9.9.9:8000", models=(MODEL,)), "registry")
    kept = pool.get(B1)
    changes = apply_static(
        pool, [BackendSpec(B1, models=(MODEL,)), BackendSpec(B3, models=(MODEL,))]
    )
    assert sorted(changes) == sorted([f"{B3} added", f"{B2} removed"])
    assert removed == [B2]
    assert pool.get(B1) is kept  # an entry kept keeps its identity and health state
    assert {b.id for b in pool.backends} == {B1, B3, "http://10.9.9.9:8000"}
    assert pool.get(B3) is not None and pool.get(B3).origin == "config"  # type: ignore[union-attr]
    assert {b.id for b in pool.candidates(MODEL)} == {B1, B3, "http://10.9.9.9:8000"}
    assert (
        apply_static(pool, [BackendSpec(B1, models=(MODEL,)), BackendSpec(B3, models=(MODEL,))])
        == []
    )


def loaded(p: BackendPool, **running: float) -> None:
    """Each backend's polled running requests (b1=..., b2=..., b3=...; the rest idle)."""
    for i, backend in enumerate(p.backends, 1):
        LoadView.record(backend, running.get(f"b{i}", 0.0), 0.0, 0.1)


async def bound_evenly(engine: object, per_backend: int) -> None:
    for target in (B1, B2, B3) * per_backend:
        await engine.resolve(uuid.uuid4(), MODEL, (B1, B2, B3), lambda c, t=target: t)  # type: ignore[attr-defined]


async def test_rebalance_evens_load_not_binding_counts() -> None:
    """Four bindings on each backend but the load on one: bindings move from the most to the
    least loaded backend, though their counts were even."""
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2, B3)
    engine, _reg = make_engine(store, clock)
    await bound_evenly(engine, 4)
    loaded(p, b1=14.0, b2=5.0, b3=0.0)
    rules = MoverRules(rebalance_moves_per_minute=60.0, rebalance_after_s=2.0)
    mover = Mover(engine, p, SlotStore(store, clock), rules, clock)
    moved = []
    for _ in range(4):
        clock.advance(1.0)
        moved.append(await mover.tick())
    assert moved[:2] == [None, None] and "rebalance" in moved  # after the streak
    assert engine.cache.bindings_of(B1) < 4 < engine.cache.bindings_of(B3)
    assert engine.cache.bindings_of(B2) == 4


async def test_even_load_moves_nothing_whatever_the_binding_counts() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2, B3)
    engine, _reg = make_engine(store, clock)
    for target in [B1] * 10 + [B2] * 2 + [B3] * 2:  # counts skewed 2.1x
        await engine.resolve(uuid.uuid4(), MODEL, (B1, B2, B3), lambda c, t=target: t)
    loaded(p, b1=6.0, b2=7.0, b3=6.0)
    mover = Mover(engine, p, SlotStore(store, clock), MoverRules(rebalance_after_s=1.0), clock)
    for _ in range(20):
        clock.advance(1.0)
        assert await mover.tick() is None
    loaded(p)  # idle: the counts stand in for the load, and they are skewed
    moves = 0
    for _ in range(20):
        clock.advance(1.0)
        moves += (await mover.tick()) == "rebalance"
    assert moves > 0


async def test_a_load_spike_or_a_lone_hot_pair_is_not_rebalanced() -> None:
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2, B3)
    engine, _reg = make_engine(store, clock)
    await bound_evenly(engine, 2)
    rules = MoverRules(rebalance_moves_per_minute=600.0, rebalance_after_s=0.0)
    mover = Mover(engine, p, SlotStore(store, clock), rules, clock)
    loaded(p, b1=3.0, b2=3.0, b3=3.0)
    for _ in range(10):
        clock.advance(0.2)
        assert await mover.tick() is None
    loaded(p, b1=13.0, b2=3.0, b3=3.0)  # a spike of 0.4 s: smoothed away
    for _ in range(2):
        clock.advance(0.2)
        assert await mover.tick() is None
    loaded(p, b1=3.0, b2=3.0, b3=3.0)
    for _ in range(20):
        clock.advance(0.2)
        assert await mover.tick() is None
    lone = pool(B1, B2)
    engine2, _ = make_engine(MemoryBindingStore(), clock)
    await engine2.resolve(uuid.uuid4(), MODEL, (B1, B2), lambda c: B1)  # one pair on B1
    loaded(lone, b1=20.0, b2=0.0)
    mover2 = Mover(engine2, lone, SlotStore(MemoryBindingStore(), clock), rules, clock)
    for _ in range(20):
        clock.advance(1.0)
        assert await mover2.tick() is None


async def test_under_load_only_pairs_this_node_has_not_served_lately_move() -> None:
    """The busy pair on the busiest backend stays (moving it costs its cache); an idle one on
    the same backend moves."""
    clock, store = Clock(), MemoryBindingStore()
    p = pool(B1, B2, B3)
    engine, _reg = make_engine(store, clock)
    busy, idle = uuid.uuid4(), uuid.uuid4()
    for key in (busy, idle):
        await engine.resolve(key, MODEL, (B1, B2, B3), lambda c: B1)
    for target in (B2, B3):
        await engine.resolve(uuid.uuid4(), MODEL, (B1, B2, B3), lambda c, t=target: t)
    loaded(p, b1=14.0, b2=5.0, b3=1.0)
    rules = MoverRules(rebalance_moves_per_minute=600.0, rebalance_after_s=0.0)
    mover = Mover(engine, p, SlotStore(store, clock), rules, clock)
    moves = 0
    for _ in range(40):
        clock.advance(1.0)
        engine.served(busy, MODEL, B1)
        moves += (await mover.tick()) == "rebalance"
    assert moves == 1
    assert engine.cache.lookup((busy, MODEL))[0] == B1  # type: ignore[index]
    assert engine.cache.lookup((idle, MODEL))[0] == B3  # type: ignore[index]
