"""The router: affinity, spill, bypass and fallback over a real backend pool and engine on the
memory store; no Postgres, no sockets."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.health import BackendHealth
from affinity_node.routing.router import AffinityRules, NoBackend, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.memory import MemoryBindingStore
from tests.unit.fakes import KEY, MODEL, PAIR, Clock, FlakyStore, make_engine, sample

URLS = ("http://b1:8000", "http://b2:8000", "http://b3:8000")
EXTERNAL = "http://ext:8000"


@dataclass
class Parts:
    router: Router
    pool: BackendPool
    health: BackendHealth
    registry: CollectorRegistry
    """The engine's metrics."""
    store: MemoryBindingStore
    engine: AffinityEngine
    affinity: CollectorRegistry
    """The router's metrics (spills)."""


def setup(store: MemoryBindingStore | None = None, rules: AffinityRules | None = None) -> Parts:
    clock = Clock()
    store = store or MemoryBindingStore(clock)
    pool = BackendPool(
        [BackendSpec(u, models=[MODEL]) for u in URLS]
        + [BackendSpec(EXTERNAL, kind="external", models=[MODEL, "embed"])],
        [ModelSpec(MODEL), ModelSpec("embed")],
    )
    engine, registry = make_engine(store, clock)
    affinity = CollectorRegistry()
    router = Router(
        pool,
        make_strategy("round_robin"),
        engine,
        rules or AffinityRules(),
        AffinityMetrics(affinity),
    )
    return Parts(
        router,
        pool,
        BackendHealth(pool, eject_after_failures=1),
        registry,
        store,
        engine,
        affinity,
    )


async def test_a_pair_sticks_to_one_vllm_backend_and_never_to_an_external_one() -> None:
    parts = setup()
    router = parts.router
    first = await router.route(KEY, MODEL, affinity_path=True)
    assert first.affinity == "miss" and first.backend.kind == "vllm"
    for _ in range(5):
        again = await router.route(KEY, MODEL, affinity_path=True)
        assert (again.backend, again.affinity, again.bound) == (first.backend, "hit", first.backend)


async def test_new_bindings_go_to_the_backends_holding_the_fewest() -> None:
    router = setup().router
    chosen = [(await router.route(uuid4(), MODEL, affinity_path=True)).backend.id for _ in range(9)]
    assert sorted(chosen.count(u) for u in URLS) == [3, 3, 3]


async def test_an_overloaded_bound_backend_spills_one_request_and_keeps_the_binding() -> None:
    parts = setup()
    router = parts.router
    bound = (await router.route(KEY, MODEL, affinity_path=True)).backend
    bound.inflight = 12  # mean of the four (one external) is 3: 12 > 3.75 and 12 >= 3 + 8
    spilled = await router.route(KEY, MODEL, affinity_path=True)
    assert spilled.affinity == "spill" and spilled.backend is not bound
    assert spilled.bound is bound
    router.succeeded(spilled, KEY, MODEL, spilled.backend, [])
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == bound.id  # a spill never moves it
    bound.inflight = 10  # 10 < 2.5 + 8: light enough again
    assert (await router.route(KEY, MODEL, affinity_path=True)).affinity == "hit"


async def test_an_ejected_bound_backend_rebinds() -> None:
    parts = setup()
    router = parts.router
    bound = (await router.route(KEY, MODEL, affinity_path=True)).backend
    parts.health.request_failed(bound, "connect refused")
    moved = await router.route(KEY, MODEL, affinity_path=True)
    assert moved.affinity == "rebind" and moved.backend is not bound
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == moved.backend.id


async def test_a_retry_elsewhere_moves_the_binding_only_when_the_bound_backend_is_unhealthy() -> (
    None
):
    parts = setup()
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    bound = route.backend
    other = router.retry_target(route, MODEL, [bound])
    assert other is not None and other.kind == "vllm"  # a bound pair retries where it can bind
    # One error does not make a backend unhealthy: the retry is a spill, the binding stays.
    assert router.retry_header(route, bound) == "spill"
    router.succeeded(route, KEY, MODEL, other, failed=[bound])
    await parts.engine.stop()
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == bound.id
    assert sample(parts.affinity, "affinity_spills_total", model=MODEL, reason="failover") == 1
    # Ejected (here after one failure): the retry rebinds, and the binding moves. What the
    # header said decides, even if health changes before the success is reported.
    parts.health.request_failed(bound, "connect refused")
    assert router.retry_header(route, bound) == "rebind"
    router.succeeded(route, KEY, MODEL, other, failed=[bound])
    await parts.engine.stop()  # waits for the background move
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == other.id


async def test_failover_never_binds_to_an_external_backend() -> None:
    parts = setup()
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    bound = route.backend
    parts.health.request_failed(bound, "connect refused")
    external = parts.pool.get(EXTERNAL)
    assert external is not None
    assert router.retry_header(route, bound) == "rebind"
    router.succeeded(route, KEY, MODEL, external, failed=[bound])
    await parts.engine.stop()
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == bound.id


async def test_database_down_serves_degraded() -> None:
    clock = Clock()
    store = FlakyStore(clock)
    store.down = True
    parts = setup(store)
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    assert route.affinity == "degraded" and route.bound is None


async def test_affinity_off_or_no_vllm_backend_bypasses() -> None:
    parts = setup(rules=AffinityRules(enabled=False))
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    assert route.affinity == "bypass"
    assert await parts.store.read(PAIR) is None
    parts = setup()
    router = parts.router
    embed = await router.route(KEY, "embed", affinity_path=True)  # only an external backend
    assert (embed.affinity, embed.backend.id) == ("bypass", EXTERNAL)
    assert await parts.store.read((KEY, "embed")) is None


async def test_no_healthy_backend_is_an_error() -> None:
    parts = setup()
    router = parts.router
    for backend in parts.pool.backends:
        parts.health.request_failed(backend, "down")
    with pytest.raises(NoBackend):
        await router.route(KEY, MODEL, affinity_path=True)


async def test_hits_are_counted_per_model() -> None:
    parts = setup()
    router = parts.router
    for _ in range(3):
        await router.route(KEY, MODEL, affinity_path=True)
    assert sample(parts.registry, "affinity_cache_hits_total", model=MODEL) == 2
