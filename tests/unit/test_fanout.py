"""Load-aware fan-out on the memory store with a hand-moved clock: grow, shrink, hysteresis,
concurrent decisions, member choice, and the spill that is left when a set cannot grow."""

from __future__ import annotations

import uuid
from collections import Counter

from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.fanout import FanoutController, FanoutRules
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.load_view import LoadRules, LoadView
from affinity_node.routing.members import conversation_key, rendezvous
from affinity_node.routing.router import AffinityRules, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.memory import MemoryBindingStore
from tests.unit.fakes import B1, B2, B3, KEY, MODEL, PAIR, Clock, make_engine, sample

B4 = "http://b4:8000"
ALL = (B1, B2, B3, B4)


def pool() -> BackendPool:
    return BackendPool([BackendSpec(u, models=[MODEL]) for u in ALL], [ModelSpec(MODEL)])


def set_load(p: BackendPool, view: LoadView, **per_backend: tuple[float, float]) -> None:
    """running, waiting per backend (b1=... b4=...); the rest idle."""
    for i, backend in enumerate(p.backends, 1):
        running, waiting = per_backend.get(f"b{i}", (0.0, 0.0))
        view.record(backend, running, waiting, 0.1)
    view.classify()


class Fleet:
    """One node's pool, load view, engine and controller over a shared store and clock."""

    def __init__(self, store: MemoryBindingStore, clock: Clock, **rules: float) -> None:
        self.backends = pool()
        self.view = LoadView(self.backends, LoadRules(queue_bound=4))
        self.engine, self.metrics_registry = make_engine(store, clock)
        self.fanout = FanoutController(
            self.engine, self.view, self.backends, FanoutRules(**rules), clock
        )  # type: ignore[arg-type]
        self.router = Router(
            self.backends,
            make_strategy("round_robin"),
            self.engine,
            AffinityRules(),
            AffinityMetrics(CollectorRegistry()),
            BackendHealth(self.backends),
            self.fanout,
        )


async def test_a_hot_set_grows_by_the_least_loaded_backend_after_the_streak() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, max_fanout=4, grow_after_s=2.0)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    set_load(f.backends, f.view, b1=(8, 6), b2=(3, 0), b3=(1, 0), b4=(2, 0))
    for advance in (0.0, 1.0, 0.9):  # hot, but not for 2 s yet
        clock.advance(advance)
        await f.router.route(KEY, MODEL, affinity_path=True)
    assert (await store.read(PAIR)).fanout == ()  # type: ignore[union-attr]
    clock.advance(0.2)
    await f.router.route(KEY, MODEL, affinity_path=True)
    await f.fanout.stop()
    stored = await store.read(PAIR)
    assert stored is not None and (stored.backend, stored.fanout) == (B1, (B3,))
    assert stored.version > res.version
    assert f.engine.cache.get(PAIR).fanout == (B3,)  # type: ignore[union-attr]
    assert (
        sample(
            f.metrics_registry,
            "affinity_fanout_changes_total",
            model=MODEL,
            direction="grow",
            reason="hot",
        )
        == 1
    )


async def test_a_streak_broken_by_a_cool_poll_starts_over() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, grow_after_s=2.0)
    await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    set_load(f.backends, f.view, b1=(8, 6))
    await f.router.route(KEY, MODEL, affinity_path=True)
    clock.advance(1.5)
    set_load(f.backends, f.view, b1=(2, 0))  # not hot any more
    await f.router.route(KEY, MODEL, affinity_path=True)
    set_load(f.backends, f.view, b1=(8, 6))
    clock.advance(1.5)
    await f.router.route(KEY, MODEL, affinity_path=True)  # the new streak is 0 s old
    clock.advance(1.0)
    await f.router.route(KEY, MODEL, affinity_path=True)
    await f.fanout.stop()
    assert (await store.read(PAIR)).fanout == ()  # type: ignore[union-attr]


async def test_many_nodes_deciding_at_once_grow_the_set_by_exactly_one() -> None:
    clock, store = Clock(), MemoryBindingStore()
    nodes = [Fleet(store, clock, grow_after_s=1.0) for _ in range(3)]
    for n in nodes:
        await n.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
        set_load(n.backends, n.view, b1=(8, 6), b2=(9, 5))
        await n.router.route(KEY, MODEL, affinity_path=True)
    clock.advance(1.5)
    for n in nodes:  # all three see the same load and decide together
        await n.router.route(KEY, MODEL, affinity_path=True)
    for n in nodes:
        await n.fanout.stop()
    stored = await store.read(PAIR)
    assert stored is not None and len(stored.fanout) == 1
    grows = sum(
        sample(
            n.metrics_registry,
            "affinity_fanout_changes_total",
            model=MODEL,
            direction="grow",
            reason="hot",
        )
        for n in nodes
    )
    assert grows == 1


async def test_a_set_at_its_largest_does_not_grow_nor_one_with_a_cool_member() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, max_fanout=2, grow_after_s=0.5)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2,), "grow", "hot")
    set_load(f.backends, f.view, b1=(8, 6))  # b2 is idle (cool): the set still has room
    for _ in range(3):
        await f.router.route(KEY, MODEL, affinity_path=True)
        clock.advance(1.0)
    set_load(f.backends, f.view, b1=(8, 6), b2=(8, 6))  # all hot, but max_fanout is 2
    for _ in range(3):
        await f.router.route(KEY, MODEL, affinity_path=True)
        clock.advance(1.0)
    await f.fanout.stop()
    assert (await store.read(PAIR)).fanout == (B2,)  # type: ignore[union-attr]


async def test_one_hot_member_grows_the_set_when_no_member_is_cool() -> None:
    """Conversations stay on their member, so one member can queue while another is busy
    but not saturated: the set grows (moving ~1/k of each member's conversations)."""
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, max_fanout=4, grow_after_s=0.5)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2,), "grow", "hot")
    set_load(f.backends, f.view, b1=(8, 6), b2=(6, 0))  # b1 queues; b2 above the mean, no queue
    assert B2 not in f.view.hot(MODEL) and B2 not in f.view.cool(MODEL)
    for _ in range(3):
        await f.router.route(KEY, MODEL, affinity_path=True)
        clock.advance(1.0)
    await f.fanout.stop()
    grown = (await store.read(PAIR)).fanout  # type: ignore[union-attr]
    assert len(grown) == 2 and grown[0] == B2 and grown[1] in (B3, B4)


async def test_a_cool_set_shrinks_by_its_newest_member_after_the_hysteresis() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, shrink_after_s=120.0)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2, B3), "grow", "hot")
    set_load(f.backends, f.view)  # everything idle: cool
    f.fanout.sweep()
    clock.advance(100.0)
    f.fanout.sweep()
    set_load(f.backends, f.view, b2=(9, 6))  # a hot moment resets the cool streak
    f.fanout.sweep()
    set_load(f.backends, f.view)
    f.fanout.sweep()
    clock.advance(100.0)
    f.fanout.sweep()
    await f.fanout.stop()
    assert (await store.read(PAIR)).fanout == (B2, B3)  # type: ignore[union-attr]
    clock.advance(30.0)
    f.fanout.sweep()
    await f.fanout.stop()
    stored = await store.read(PAIR)
    assert stored is not None and stored.fanout == (B2,)  # the newest member left
    assert (
        sample(
            f.metrics_registry,
            "affinity_fanout_changes_total",
            model=MODEL,
            direction="shrink",
            reason="cool",
        )
        == 1
    )


async def test_an_unhealthy_member_leaves_the_set_at_once() -> None:

    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2, B3), "grow", "hot")
    BackendHealth(f.backends, eject_after_failures=1).request_failed(f.backends.get(B2), "down")  # type: ignore[arg-type]
    set_load(f.backends, f.view, b1=(5, 0), b3=(5, 0))
    f.fanout.sweep()
    await f.fanout.stop()
    assert (await store.read(PAIR)).fanout == (B3,)  # type: ignore[union-attr]


async def test_a_conversation_keeps_its_member_and_conversations_spread() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock)
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2, B3), "grow", "hot")
    chosen = Counter()
    for i in range(300):
        payload = {
            "messages": [
                {"role": "system", "content": "shared prompt"},
                {"role": "user", "content": f"conversation {i}"},
            ]
        }
        first = await f.router.route(KEY, MODEL, True, lambda p=payload: conversation_key(p, None))
        later = dict(
            payload,
            messages=[
                *payload["messages"],  # type: ignore[list-item]
                {"role": "assistant", "content": "sure"},
                {"role": "user", "content": "and then?"},
            ],
        )
        again = await f.router.route(KEY, MODEL, True, lambda p=later: conversation_key(p, None))
        assert again.backend is first.backend  # every turn, the same member
        chosen[first.backend.id] += 1
    assert set(chosen) == {B1, B2, B3} and min(chosen.values()) > 60


def test_growing_a_set_moves_about_one_conversation_in_k() -> None:
    keys = [uuid.uuid4().bytes for _ in range(6000)]
    before = {k: rendezvous(k, (B1, B2, B3)) for k in keys}
    after = {k: rendezvous(k, (B1, B2, B3, B4)) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == B4 for k in moved)  # only to the new member
    assert 0.2 < len(moved) / len(keys) < 0.3  # about 1/4
    shrunk = {k: rendezvous(k, (B1, B2)) for k in keys}
    assert all(shrunk[k] == before[k] for k in keys if before[k] != B3)  # only B3's move


def test_the_conversation_key_prefers_what_the_client_says() -> None:
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert conversation_key({**chat, "prompt_cache_key": "c-1"}, "sess") == conversation_key(
        {"prompt_cache_key": "c-1"}, None
    )
    assert conversation_key(chat, "sess") == conversation_key({}, "sess")
    assert conversation_key(chat, None) != conversation_key(
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "v"}]}, None
    )
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "u"}]}]}
    assert conversation_key(parts, None) == conversation_key(
        {"messages": [{"role": "user", "content": "u"}]}, None
    )
    long_prompt = "x" * 1000
    assert conversation_key({"prompt": long_prompt}, None) == conversation_key(
        {"prompt": long_prompt + " and more"}, None
    )


async def test_spill_is_left_only_when_the_set_cannot_grow() -> None:
    clock, store = Clock(), MemoryBindingStore()
    growable = Fleet(store, clock, max_fanout=4)
    bound = (await growable.router.route(KEY, MODEL, affinity_path=True)).backend
    bound.inflight = 20  # far above the node's own mean: the old spill rule would fire
    assert (await growable.router.route(KEY, MODEL, affinity_path=True)).affinity == "hit"
    fixed = Fleet(MemoryBindingStore(), clock, max_fanout=1)
    bound = (await fixed.router.route(KEY, MODEL, affinity_path=True)).backend
    bound.inflight = 20
    assert (await fixed.router.route(KEY, MODEL, affinity_path=True)).affinity == "spill"
