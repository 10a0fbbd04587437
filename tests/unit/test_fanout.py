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
from affinity_node.routing.members import (
    PLACEMENT_MARGIN,
    Placements,
    conversation_key,
    first_turn,
    place,
    rendezvous,
)
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


def chat(i: int, answered: bool = False) -> dict[str, object]:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "shared prompt"},
        {"role": "user", "content": f"conversation {i}"},
    ]
    if answered:
        messages += [{"role": "assistant", "content": "sure"}, {"role": "user", "content": "and?"}]
    return {"messages": messages}


async def route_turn(f: Fleet, payload: dict[str, object]) -> str:
    route = await f.router.route(
        KEY,
        MODEL,
        True,
        lambda: conversation_key(payload, None),
        lambda: first_turn(payload),
    )
    return route.backend.id


async def a_set_of_three(f: Fleet) -> None:
    res = await f.engine.resolve(KEY, MODEL, ALL, lambda c: B1)
    assert await f.engine.set_members(PAIR, res.version, (B2, B3), "grow", "hot")


async def test_a_new_conversation_goes_to_the_least_loaded_member_and_stays_there() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock)
    await a_set_of_three(f)
    set_load(f.backends, f.view, b1=(16, 3), b2=(16, 1), b3=(9, 0))
    placed = {i: await route_turn(f, chat(i)) for i in range(60)}
    assert set(placed.values()) == {B3}  # off the queueing members, to the least loaded
    set_load(f.backends, f.view, b1=(1, 0), b2=(1, 0), b3=(14, 2))
    for i, member in placed.items():  # later turns stay, whatever the load says now
        assert await route_turn(f, chat(i, answered=True)) == member
    # Existing conversations this node did not place keep their rendezvous member.
    for i in range(100, 160):
        later = chat(i, answered=True)
        expected = rendezvous(conversation_key(later, None), (B1, B2, B3))
        assert await route_turn(f, later) == expected


async def test_without_a_queue_new_conversations_keep_their_rendezvous_member_on_every_node() -> (
    None
):
    clock, store = Clock(), MemoryBindingStore()
    a, b = Fleet(store, clock), Fleet(store, clock)
    await a_set_of_three(a)
    set_load(a.backends, a.view, b1=(15, 0), b2=(8, 0), b3=(1, 0))  # no queue anywhere
    set_load(b.backends, b.view, b1=(9, 0), b2=(9, 0), b3=(9, 0))
    spread = Counter()
    for i in range(120):
        member = await route_turn(a, chat(i))
        spread[member] += 1
        assert member == rendezvous(conversation_key(chat(i), None), (B1, B2, B3))
        assert await route_turn(b, chat(i, answered=True)) == member  # the other node finds it
    assert len(a.router._placements) == 0  # nothing to remember
    assert set(spread) == {B1, B2, B3}


async def test_a_member_below_the_least_load_plus_the_margin_is_a_tie_and_beyond_it_is_not() -> (
    None
):
    members = (B1, B2, B3)
    key = next(k for k in (uuid.uuid4().bytes for _ in range(100)) if rendezvous(k, members) == B1)
    loads = {B1: 1.0 + PLACEMENT_MARGIN, B2: 1.0, B3: 2.0 + PLACEMENT_MARGIN}
    assert place(key, members, loads.__getitem__, lambda m: True) == B1
    loads[B1] += 0.5
    assert place(key, members, loads.__getitem__, lambda m: True) == B2
    assert place(key, members, loads.__getitem__, lambda m: m != B1) == B1  # no queue: stays


def test_only_an_opening_turn_counts_as_a_new_conversation() -> None:
    assert first_turn(chat(1))
    assert not first_turn(chat(1, answered=True))
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    assert not first_turn(two_users)
    tool = {"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}]}
    assert not first_turn(tool)
    assert first_turn({"input": "hello"})
    assert not first_turn({"input": "hello", "previous_response_id": "resp_1"})
    items = {"input": [{"role": "user", "content": "a"}, {"type": "function_call_output"}]}
    assert not first_turn(items)
    assert not first_turn({"prompt": "a completion cannot tell"})
    assert not first_turn({"messages": "not a list"})


def test_placements_are_bounded_and_forget_the_oldest() -> None:
    memory = Placements(capacity=2)
    memory.put(b"a", B1)
    memory.put(b"b", B2)
    assert memory.get(b"a") == B1  # now the most recent
    memory.put(b"c", B3)
    assert memory.get(b"b") is None and memory.get(b"a") == B1 and memory.get(b"c") == B3
    memory.put(b"a", None)
    assert memory.get(b"a") is None and len(memory) == 1


async def requests_at(f: Fleet, clock: Clock, per_s: float, seconds: float) -> None:
    for _ in range(int(per_s * seconds)):
        clock.advance(1.0 / per_s)
        await f.router.route(KEY, MODEL, affinity_path=True)
        f.fanout.sweep()


async def test_a_set_shrinks_when_its_pairs_own_rate_falls_though_its_members_stay_busy() -> None:
    clock, store = Clock(), MemoryBindingStore()
    f = Fleet(store, clock, max_fanout=4, shrink_after_s=30.0)
    await a_set_of_three(f)
    set_load(f.backends, f.view, b1=(6, 0), b2=(6, 0), b3=(6, 0), b4=(2, 0))  # busy, not hot
    await requests_at(f, clock, 5.0, 120.0)  # steady: the set stays
    assert (await store.read(PAIR)).fanout == (B2, B3)  # type: ignore[union-attr]
    await requests_at(f, clock, 1.0, 25.0)  # quiet, not yet for long enough
    assert (await store.read(PAIR)).fanout == (B2, B3)  # type: ignore[union-attr]
    await requests_at(f, clock, 1.0, 40.0)
    await f.fanout.stop()
    assert (await store.read(PAIR)).fanout == (B2,)  # type: ignore[union-attr]
    assert sample(f.metrics_registry, "affinity_fanout_changes_total", model=MODEL,
                  direction="shrink", reason="quiet") == 1  # fmt: skip
