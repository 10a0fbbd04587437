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
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.router import AffinityRules, NoBackend, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.memory import MemoryBindingStore
from tests.unit.fakes import KEY, MODEL, PAIR, Clock, FlakyStore, make_engine, sample

URLS = ("http://b1:8000", "http://b2:8000", "http://b3:8000")
EXTERNAL = "http://ext:8000"


@dataclass
class Parts:
    router: Router
    backends: BackendPool
    health: BackendHealth
    metrics_registry: CollectorRegistry
    """The engine's metrics."""
    store: MemoryBindingStore
    engine: AffinityEngine
    affinity: CollectorRegistry
    """The router's metrics (spills)."""


def setup(
    store: MemoryBindingStore | None = None,
    rules: AffinityRules | None = None,
    eject_after_failures: int = 1,
) -> Parts:
    clock = Clock()
    store = store or MemoryBindingStore(clock)
    pool = BackendPool(
        [BackendSpec(u, models=[MODEL]) for u in URLS]
        + [BackendSpec(EXTERNAL, kind="external", models=[MODEL, "embed"])],
        [ModelSpec(MODEL), ModelSpec("embed")],
    )
    engine, registry = make_engine(store, clock)
    affinity = CollectorRegistry()
    health = BackendHealth(pool, eject_after_failures=eject_after_failures)
    router = Router(
        pool,
        make_strategy("round_robin"),
        engine,
        rules or AffinityRules(),
        AffinityMetrics(affinity),
        health,
    )
    return Parts(
        router,
        pool,
        health,
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
    router.succeeded(spilled)
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == bound.id  # a spill never moves it
    bound.inflight = 10  # 10 < 2.5 + 8: light enough again
    assert (await router.route(KEY, MODEL, affinity_path=True)).affinity == "hit"


async def test_an_ejected_bound_backend_rebinds() -> None:
    parts = setup()
    router = parts.router
    bound = (await router.route(KEY, MODEL, affinity_path=True)).backend
    for _ in range(2):  # eject_after_failures
        parts.health.request_failed(bound, "connect refused")
    moved = await router.route(KEY, MODEL, affinity_path=True)
    assert moved.affinity == "rebind" and moved.backend is not bound
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == moved.backend.id


async def test_a_retry_elsewhere_moves_the_binding_only_when_the_bound_backend_is_unhealthy() -> (
    None
):
    parts = setup(eject_after_failures=2)
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    bound = route.backend
    other = router.after_failure(route, "connect refused")
    assert other is not None and other.kind == "vllm"  # a bound pair retries where it can bind
    assert route.backend is other and route.failed == (bound,)
    # One error does not make a backend unhealthy: the retry is a spill, the binding stays.
    assert route.affinity == "spill"
    router.succeeded(route)
    await parts.engine.stop()
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == bound.id
    assert sample(parts.affinity, "affinity_spills_total", model=MODEL, reason="failover") == 1
    # A second failure ejects it (eject_after_failures=2): the retry rebinds, and the binding
    # moves to the backend the retry went to.
    again = await router.route(KEY, MODEL, affinity_path=True)
    assert again.backend is bound
    assert router.after_failure(again, "connect refused") is other
    assert again.affinity == "rebind" and not bound.healthy
    router.succeeded(again)
    await parts.engine.stop()  # waits for the background move
    stored = await parts.store.read(PAIR)
    assert stored is not None and stored.backend == other.id


async def test_one_retry_per_request() -> None:
    parts = setup(eject_after_failures=2)
    route = await parts.router.route(KEY, MODEL, affinity_path=True)
    assert parts.router.after_failure(route, "reset") is not None
    assert parts.router.after_failure(route, "reset") is None
    assert len(route.failed) == 2 and route.failed[0] is not route.failed[1]


async def test_the_retry_goes_where_the_rebind_will_go_whatever_node_decides() -> None:
    """After the bound backend fails, the retry target and the later rebind (on this node or
    any other, whatever their strategies' state) are the same backend: one cache warms."""
    targets: set[str] = set()
    rebound: set[str] = set()
    for node in range(4):
        parts = setup(eject_after_failures=2)
        router = parts.router
        await parts.store.create_if_absent(PAIR, lambda: URLS[0], 1800)
        for _ in range(node):  # each node's round robin in another state
            await router.route(uuid4(), MODEL, affinity_path=True)
        route = await router.route(KEY, MODEL, affinity_path=True)
        assert route.backend.id == URLS[0]
        target = router.after_failure(route, "connect refused")
        assert target is not None
        targets.add(target.id)
        router.after_failure(await router.route(KEY, MODEL, affinity_path=True), "refused")
        moved = await router.route(KEY, MODEL, affinity_path=True)  # ejected now: rebinds
        assert moved.affinity == "rebind"
        rebound.add(moved.backend.id)
        await parts.engine.stop()
    assert len(targets) == 1 and targets == rebound, (targets, rebound)


async def test_a_failed_set_member_retries_on_the_member_its_conversation_goes_to_next() -> None:
    parts = setup(eject_after_failures=2)
    router = parts.router
    created = await parts.store.create_if_absent(PAIR, lambda: URLS[0], 1800)
    grown = await parts.store.set_members(PAIR, created.binding.version, (URLS[1], URLS[2]))
    assert grown is not None
    conversation = b"o:conversation-7"
    route = await router.route(KEY, MODEL, affinity_path=True, conversation=lambda: conversation)
    failed = route.backend
    target = router.after_failure(route, "refused")
    assert target is not None and target is not failed
    router.after_failure(await router.route(KEY, MODEL, True, lambda: conversation), "refused")
    assert not failed.healthy
    after = await router.route(KEY, MODEL, affinity_path=True, conversation=lambda: conversation)
    assert after.backend is target


async def test_failover_never_binds_to_an_external_backend() -> None:
    parts = setup(eject_after_failures=2)
    router = parts.router
    route = await router.route(KEY, MODEL, affinity_path=True)
    bound = route.backend
    parts.health.request_failed(bound, "connect refused")
    external = parts.backends.get(EXTERNAL)
    assert external is not None
    assert router.after_failure(route, "connect refused") is not None
    assert route.affinity == "rebind"
    route.backend = external  # served by the external one after all (no vllm left, say)
    router.succeeded(route)
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
    for backend in parts.backends.backends:
        parts.health.request_failed(backend, "down")
    with pytest.raises(NoBackend):
        await router.route(KEY, MODEL, affinity_path=True)


async def test_hits_are_counted_per_model() -> None:
    parts = setup()
    router = parts.router
    for _ in range(3):
        await router.route(KEY, MODEL, affinity_path=True)
    assert sample(parts.metrics_registry, "affinity_cache_hits_total", model=MODEL) == 2
