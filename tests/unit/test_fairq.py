"""The fair queue's discipline (routing/fairq.py): who leaves first, the bound, the wait limit
and its 429/503, and that no backend with room idles while a request waits."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest

from affinity_node.routing.backends import Backend, BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.fairq import (
    DEMAND_KEY,
    SERVICE_SCOPE,
    FairQueue,
    FairRules,
    QueueRefused,
)
from affinity_node.routing.load_view import LoadView
from tests.support.waiting import wait_for

MODEL = "m"
URLS = ("http://a:1", "http://b:1")
SLOTS = 2


def _setup(**rules: float) -> tuple[FairQueue, list[Backend]]:
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    view = LoadView(pool)
    fq = FairQueue(pool, view, FairRules(**rules))  # type: ignore[arg-type]
    return fq, [b for u in URLS if (b := pool.get(u)) is not None]


def _saturate(fq: FairQueue, backends: list[Backend]) -> None:
    """Every backend running at its slots with a queue of its own, as a poll reads it."""
    for b in backends:
        LoadView.record(b, SLOTS, 1, 0.5)
    fq.learn()


def _free_one(fq: FairQueue, backend: Backend) -> None:
    """This node's request on `backend` finished: one slot frees."""
    backend.inflight -= 1


async def _queued(
    fq: FairQueue, key: UUID, n: int = 1, priority: int = 0
) -> list[asyncio.Task[Backend | None]]:
    """`n` requests of tenant `key`, once they are queued (or refused)."""
    before = fq.depth(MODEL)
    tasks = [asyncio.create_task(fq.wait(key, MODEL, priority, 100)) for _ in range(n)]
    await wait_for(
        lambda: (
            fq.depth(MODEL) + sum(t.done() for t in tasks) >= min(before + n, 10**9)
            or fq.depth(MODEL) == fq.rules.max_queue
        ),
        timeout=2.0,
        what="requests queued",
    )
    return tasks


async def _done(*tasks: asyncio.Task[Backend | None]) -> None:
    await wait_for(lambda: all(t.done() for t in tasks), timeout=2.0, what="released")


async def test_nothing_saturated_costs_nothing() -> None:
    fq, backends = _setup()
    for b in backends:
        LoadView.record(b, 1, 0, 0.1)
    fq.learn()
    assert fq.busy == set()
    assert await fq.wait(uuid4(), MODEL, 0, 100) is None


async def test_least_served_tenant_leaves_first() -> None:
    fq, backends = _setup()
    _saturate(fq, backends)
    assert MODEL in fq.busy
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)  # it has been served lately; the small tenant has not
    flood_tasks = await _queued(fq, flood, 5)
    small_task = (await _queued(fq, small))[0]
    assert fq.depth(MODEL) == 6
    backends[0].waiting = 0  # its own queue emptied: a completion frees room
    _free_one(fq, backends[0])
    fq.served(MODEL, uuid4(), 10)
    assert fq.depth(MODEL) == 5, "one slot freed: one request released"
    await _done(small_task)  # the small tenant arrived last but has the least service
    assert await small_task is backends[0]
    assert not any(t.done() for t in flood_tasks)
    for t in flood_tasks:
        t.cancel()


async def test_priority_class_first() -> None:
    fq, backends = _setup()
    _saturate(fq, backends)
    low, high = uuid4(), uuid4()
    fq.charge(high, 10_000)  # much more recent service, but a higher class
    low_task = (await _queued(fq, low))[0]
    high_task = (await _queued(fq, high, priority=5))[0]
    backends[1].waiting = 0
    _free_one(fq, backends[1])
    fq.release(MODEL)
    assert fq.depth(MODEL) == 1
    await _done(high_task)
    assert not low_task.done()
    low_task.cancel()


async def test_full_queue_pushes_out_the_heaviest() -> None:
    fq, backends = _setup(max_queue=3)
    _saturate(fq, backends)
    flood, small = uuid4(), uuid4()
    flood_tasks = await _queued(fq, flood, 3)
    small_task = (await _queued(fq, small))[0]
    assert fq.depth(MODEL) == 3
    await wait_for(lambda: any(t.done() for t in flood_tasks), timeout=2.0, what="pushed out")
    pushed = [t for t in flood_tasks if t.done()]
    assert len(pushed) == 1
    with pytest.raises(QueueRefused) as refused:
        await pushed[0]
    assert refused.value.status == 429  # the flooder holds more than its share
    assert refused.value.retry_after_s >= 1
    # The flooder's next request sorts behind everything queued: refused at once.
    with pytest.raises(QueueRefused) as again:
        await fq.wait(flood, MODEL, 0, 100)
    assert again.value.status == 429
    assert not small_task.done()
    for t in [*flood_tasks, small_task]:
        t.cancel()


async def test_wait_past_bound_503_for_a_light_tenant() -> None:
    fq, backends = _setup(max_wait_s=0.05)
    _saturate(fq, backends)
    with pytest.raises(QueueRefused) as refused:
        await fq.wait(uuid4(), MODEL, 0, 100)
    assert refused.value.status == 503
    assert refused.value.retry_after_s >= 1
    assert fq.depth(MODEL) == 0
    assert fq.busy == {MODEL}  # still saturated by the last poll


async def test_wait_past_bound_429_for_the_flooder() -> None:
    fq, backends = _setup(max_wait_s=0.05)
    _saturate(fq, backends)
    flood = uuid4()
    tasks = await _queued(fq, flood, 3)
    small = (await _queued(fq, uuid4()))[0]
    results = await asyncio.gather(*tasks, small, return_exceptions=True)
    assert all(isinstance(r, QueueRefused) for r in results)
    codes = [r.status for r in results if isinstance(r, QueueRefused)]
    assert codes[-1] == 503
    assert 429 in codes[:3]
    service_after = fq.service(flood)
    assert service_after < 1.0, "a refused request's charge is given back"


async def test_work_conserving_every_free_slot_takes_a_waiter() -> None:
    fq, backends = _setup()
    _saturate(fq, backends)
    tasks = await _queued(fq, uuid4(), 4)
    assert not any(t.done() for t in tasks), "no backend has room: nothing released"
    for b in backends:  # both queues drain and one slot frees on each
        b.waiting = 0
        _free_one(fq, b)
    fq.served(MODEL, uuid4(), 0)
    assert fq.depth(MODEL) == 2, "one release per free slot, not more"
    await wait_for(lambda: sum(t.done() for t in tasks) == 2, timeout=2.0, what="released")
    done = [t for t in tasks if t.done()]
    assert {await t for t in done} == set(backends)
    for t in done:  # sent: counted in flight now, the promise ends
        b = t.result()
        assert b is not None
        b.inflight += 1
        fq.sent(b)
    fq.release(MODEL)
    assert fq.depth(MODEL) == 2, "sent requests fill the room they were promised"
    for b in backends:  # a poll that finds room releases the rest
        LoadView.record(b, 0, 0, 0.0)
    fq.learn()
    assert fq.depth(MODEL) == 0
    await _done(*tasks)
    assert fq.busy == set(), "nothing saturated, nothing queued: the hot path is free again"


def _poll_queued(fq: FairQueue, backends: list[Backend], slots: int = 4) -> None:
    """A poll round reading every backend full at `slots` with a queue of its own."""
    for b in backends:
        LoadView.record(b, slots, 1, 0.5)
    fq.learn()


def _poll(fq: FairQueue, backends: list[Backend], running: list[int]) -> None:
    """A poll round reading `running` on each backend and no queue."""
    for b, r in zip(backends, running, strict=True):
        LoadView.record(b, r, 0, 0.5)
    fq.learn()


async def test_a_light_tenant_takes_the_reserve_a_heavy_one_waits() -> None:
    fq, backends = _setup(reserve=1)
    _saturate(fq, backends)  # 2 slots each learned
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    _poll(fq, backends, [2, 1])  # one slot left in the model: the reserve
    assert MODEL in fq.busy
    assert fq.heavy(flood) and not fq.heavy(small)
    flood_task = (await _queued(fq, flood))[0]
    assert fq.depth(MODEL) == 1, "the heavy tenant does not take the last slot"
    assert await fq.wait(small, MODEL, 0, 100) is backends[1], "the light one starts at once"
    assert fq.depth(MODEL) == 1
    backends[1].inflight += 1  # the small request is sent
    fq.sent(backends[1])
    _poll(fq, backends, [1, 2])  # one slot free: the reserve, still not the flood's
    assert fq.depth(MODEL) == 1
    _poll(fq, backends, [0, 2])  # two free: one beyond the reserve
    await _done(flood_task)
    assert await flood_task is backends[0]


async def test_with_no_reserve_the_heavy_tenant_takes_the_last_slot() -> None:
    fq, backends = _setup(reserve=0)
    _saturate(fq, backends)
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    _poll(fq, backends, [2, 1])
    assert await fq.wait(flood, MODEL, 0, 100) is backends[1]


async def test_a_lone_tenant_leaves_the_reserve_to_a_newcomer() -> None:
    """A node that has not yet heard of a newcomer (the exchange is once a second) took a lone
    flood for light and filled every slot the newcomer's node freed (a small request waited
    1.35 s behind 0.2 s requests)."""
    fq, backends = _setup(reserve=1)
    _saturate(fq, backends)
    only, newcomer = uuid4(), uuid4()
    fq.charge(only, 1000)
    _poll(fq, backends, [2, 1])
    assert fq.heavy(only)
    lone = (await _queued(fq, only))[0]
    assert not lone.done(), "the last slot is the reserve"
    assert not fq.heavy(newcomer)
    assert await fq.wait(newcomer, MODEL, 0, 100) is backends[1], "it starts at once"
    lone.cancel()


async def test_tenants_sharing_equally_are_served_work_conserving() -> None:
    fq, backends = _setup(reserve=1)
    _saturate(fq, backends)
    a, b = uuid4(), uuid4()
    fq.charge(a, 1000)
    fq.charge(b, 1000)
    _poll(fq, backends, [2, 1])
    assert not fq.heavy(a) and not fq.heavy(b)
    assert await fq.wait(a, MODEL, 0, 100) is backends[1], "nobody above the mean"


async def test_a_guarded_model_admits_between_polls_only_the_room_it_has() -> None:
    """A model checked only at polls let a poll interval of a flood into the vLLM queues each
    time a poll saw room; guarded, each request takes room until none is left."""
    fq, backends = _setup(reserve=0)
    _saturate(fq, backends)
    _poll(fq, backends, [2, 0])  # two slots free, no new poll until the end
    tenant = uuid4()
    admitted = [await fq.wait(tenant, MODEL, 0, 100) for _ in range(2)]
    assert admitted == [backends[1], backends[1]]
    for b in admitted:
        assert b is not None
        b.inflight += 1  # sent
        fq.sent(b)
    third = (await _queued(fq, tenant))[0]
    assert fq.depth(MODEL) == 1 and not third.done()
    third.cancel()


async def test_the_guard_lifts_when_a_poll_finds_the_model_half_empty() -> None:
    fq, backends = _setup()
    _saturate(fq, backends)
    _poll(fq, backends, [1, 1])  # half full: still guarded (hysteresis)
    assert MODEL in fq.busy
    _poll(fq, backends, [1, 0])
    assert fq.busy == set()
    assert await fq.wait(uuid4(), MODEL, 0, 100) is None


def test_quota_is_a_max_min_fair_split_of_the_nodes_demands_in_whole_slots() -> None:
    from affinity_node.routing.fairq import _split

    # Both flooded: equal parts, the odd slot to the first node id (1.5 each held only 1).
    assert _split(31, {"a": 100, "b": 100}) == {"a": 16, "b": 15}
    assert _split(3, {"b": 20, "a": 20}) == {"a": 2, "b": 1}
    assert _split(31, {"a": 100, "b": 5}) == {"a": 26, "b": 5}  # the other asks little
    assert _split(31, {"a": 0, "b": 100}) == {"a": 1, "b": 30}  # no demand yet: one slot
    assert _split(30, {"a": 100, "b": 100, "c": 2.5}) == {"a": 14, "b": 14, "c": 2}
    for room in range(0, 12):
        for demands in ({"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 7, "c": 30}):
            parts = _split(room, demands)
            assert all(p == int(p) for p in parts.values())
            assert sum(parts.values()) == min(room, sum(max(d, 1) for d in demands.values()))


async def test_a_tenant_heavy_on_other_nodes_is_heavy_here() -> None:
    """A node that sees the flood sharing equally with another tenant would take it for
    light: the others' rows say where else it floods."""
    fq, backends = _setup(reserve=1)
    _saturate(fq, backends)
    flood, small, other = uuid4(), uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(other, 1000)
    _poll(fq, backends, [2, 1])
    assert not fq.heavy(flood), "an equal share on this node"
    fq.fleet_update(
        [(small, SERVICE_SCOPE, "node-b", 0.0, 50.0), (flood, SERVICE_SCOPE, "node-b", 0.0, 900.0)]
    )
    _poll(fq, backends, [2, 1])
    assert fq.heavy(flood) and not fq.heavy(small)
    assert fq.service(flood) > 1000, "its service here and there"


async def test_a_node_holding_its_quota_admits_no_heavy_request() -> None:
    fq, backends = _setup(reserve=0)
    _saturate(fq, backends)
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    fq.fleet_rows()  # publishes this node's demand (nothing yet)
    fq.fleet_update([(DEMAND_KEY, MODEL, "node-b", 50.0, 0.0)])
    backends[0].inflight = 2  # this node holds 2 of the 4 slots: its half
    _poll(fq, backends, [2, 0])  # the poll shows two free: the other node's, not ours
    assert fq.quota(MODEL) == 1.0  # no published demand here yet: one slot
    flood_task = (await _queued(fq, flood))[0]
    assert not flood_task.done()
    assert await fq.wait(small, MODEL, 0, 100) is backends[1], "a light request still goes"
    flood_task.cancel()


def _node(node_id: str) -> tuple[FairQueue, list[Backend]]:
    """One node's queue over its own view of the same 2 backends of 4 slots, 2 reserved."""
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    backends = [b for u in URLS if (b := pool.get(u)) is not None]
    fq = FairQueue(pool, LoadView(pool), FairRules(reserve=2), nodes=lambda: 2, node_id=node_id)
    _poll_queued(fq, backends)  # 4 slots each, confirmed by a queue: 8, guarded
    return fq, backends


async def test_two_nodes_between_polls_take_all_but_the_reserve_and_no_more() -> None:
    """Both nodes release from the same poll; neither sees the other's requests since.
    Each keeps the reserve and what the other may still take (its part of the room above
    the reserve, no more than its quota leaves it): together they leave exactly the
    reserve. With the whole room open to each, both took it; with each held to half the
    room above the reserve, the slot node-b's quota left it idled until the next poll."""
    (fa, ba), (fb, bb) = _node("node-a"), _node("node-b")
    flood = uuid4()
    for fq in (fa, fb):
        fq.charge(flood, 1000)
        fq.charge(uuid4(), 10)  # a small tenant served lately: the flood is heavy
    for b in bb:
        b.inflight = 1  # node-b runs one request on each backend
    waiting = {fq: await _queued(fq, flood, 6) for fq in (fa, fb)}
    for fq, other in ((fa, "node-b"), (fb, "node-a")):
        fq.fleet_rows()
        fq.fleet_update([(DEMAND_KEY, MODEL, other, 8.0, 0.0)])
    for fq, backends in ((fa, ba), (fb, bb)):
        _poll(fq, backends, [1, 1])  # node-b's two: 6 free, 2 of them the reserve
    assert fa.quota(MODEL) == fb.quota(MODEL) == 3.0  # of the 6 slots beyond the reserve
    taken = {fq: 6 - fq.depth(MODEL) for fq in (fa, fb)}  # released by the poll
    assert taken[fb] == 1, "node-b's quota less the 2 it holds"
    assert taken[fa] == 3, "node-a's quota: node-b can take only 1 of the 4 above the reserve"
    assert 8 - 2 - taken[fa] - taken[fb] == 2, "the reserve is left to the small tenants"
    for tasks in waiting.values():
        for t in tasks:
            t.cancel()


async def _flooded_2x2(
    node_id: str, other: str
) -> tuple[FairQueue, list[Backend], list[asyncio.Task[Backend | None]]]:
    """Node `node_id` of two, 1 slot reserved, over a backend of 2 slots (confirmed by its
    queue) and one never seen queueing (taken for 3: one probe slot), with 4 of the flood's
    requests queued here and the other node's demand at 20."""
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    confirmed, estimated = [b for u in URLS if (b := pool.get(u)) is not None]
    fq = FairQueue(pool, LoadView(pool), FairRules(reserve=1), nodes=lambda: 2, node_id=node_id)
    LoadView.record(confirmed, 2, 5, 0.5)
    LoadView.record(estimated, 2, 0, 0.5)
    fq.learn()
    flood = uuid4()
    fq.charge(flood, 1000)
    waiting = await _queued(fq, flood, 4)
    fq.fleet_rows()
    fq.fleet_update([(DEMAND_KEY, MODEL, other, 20.0, 0.0)])
    return fq, [confirmed, estimated], waiting


async def test_the_split_of_the_room_above_the_reserve_leaves_out_the_probe_slot() -> None:
    """The room above the reserve is counted as the room is (without an estimated backend's
    probe slot): counted with it, each node kept a slot for the other that neither could
    take, and a 2-node fleet of 2 x 2 slots ran 2 of its 3 unreserved slots."""
    fq, backends, waiting = await _flooded_2x2("node-a", "node-b")
    _poll(fq, backends, [1, 1])  # one slot above the reserve: node-a's
    await wait_for(lambda: any(t.done() for t in waiting), what="node-a's slot")
    for t in waiting:
        t.cancel()


async def test_the_quotas_add_up_to_the_room_above_the_reserve_without_the_probe_slot() -> None:
    """A backend never seen queueing is taken for one slot larger (its probe slot), and under
    a flood held off vLLM's queue it is never confirmed. Counted in the quotas, that slot
    came out of the reserve whenever every node held its quota (the flood took 97% of what
    the small tenants left in the noisy demo, where the reserve leaves it 92%)."""
    quotas = []
    for node, other in (("node-a", "node-b"), ("node-b", "node-a")):
        fq, _, waiting = await _flooded_2x2(node, other)
        quotas.append(fq.quota(MODEL))
        for t in waiting:
            t.cancel()
    assert sum(quotas) == 2 + 2 - 1, quotas


async def test_room_above_the_reserve_kept_for_a_node_at_its_quota_goes_to_this_one() -> None:
    """The odd slot above the reserve is the other node's by the split, but the poll shows
    it holding its whole quota already: it cannot take that slot, so this node does. Kept
    for it, the slot idled for good while this node's queue waited (a CI failure: the flood
    ran 2 of the fleet's 3 unreserved slots)."""
    fq, backends, waiting = await _flooded_2x2("node-b", "node-a")
    assert fq.quota(MODEL) == 1.0, "node-a's is 2: 2 + 2 - 1 = 3 split, the odd slot to it"
    # node-a holds its 2 (one on each), this node none: 2 free, 1 above the reserve, and
    # the split of that one slot gives it to node-a, which is at its quota.
    _poll(fq, backends, [1, 1])
    await wait_for(lambda: any(t.done() for t in waiting), what="the slot node-a cannot take")
    assert sum(t.done() for t in waiting) == 1, "the reserve stays"
    for t in waiting:
        t.cancel()


async def test_a_light_request_passes_a_heavy_head_that_cannot_go() -> None:
    fq, backends = _setup(reserve=1)
    _saturate(fq, backends)
    flood, small = uuid4(), uuid4()
    fq.charge(small, 10)
    flood_task = (await _queued(fq, flood))[0]  # queued while the flood was not yet heavy
    fq.charge(flood, 1000)
    small_task = (await _queued(fq, small))[0]
    _poll(fq, backends, [2, 1])  # one slot: the reserve
    await _done(small_task)
    assert not flood_task.done()
    flood_task.cancel()


async def test_a_heavy_request_goes_to_the_backend_where_this_node_is_under_its_part() -> None:
    """The model's quota alone let two nodes fill one backend from the same stale poll while
    its peer idled: each node's part of each backend follows the backend's capacity."""
    fq, backends = _setup(reserve=0)
    _saturate(fq, backends)  # 2 slots each
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    fq.fleet_rows()
    fq.fleet_update([(DEMAND_KEY, MODEL, "node-b", 50.0, 0.0)])
    fq._published[MODEL] = 50.0  # as if published at the last exchange: equal demand
    assert fq.quota(MODEL) == 2.0
    backends[0].inflight = 1  # this node holds its part (1 of 2) of backend 0
    _poll(fq, backends, [1, 1])  # each shows a free slot; backend 0's is the other node's part
    assert await fq.wait(flood, MODEL, 0, 100) is backends[1]
    assert not fq.has_room(backends[0], MODEL, flood)
    assert fq.has_room(backends[0], MODEL, small), "a light tenant may take it"


async def test_each_backend_keeps_its_share_of_the_reserve_from_every_nodes_parts() -> None:
    """Two nodes, each with a quota of 7 of two 8-slot backends less 2 reserved: each node's
    odd slot lands on a different backend, so the flood fills neither to its last slot.
    Rounded one by one, both nodes put 4 on the same backend (8 of 8) while the reserve's
    2 free slots sat on its peer, and a light request sent there by a view one poll old
    waited in the vLLM queue."""
    per_backend = {u: 0.0 for u in URLS}
    for node, other in (("node-a", "node-b"), ("node-b", "node-a")):
        fq, backends = _node(node)  # 2 x 4 slots, 2 reserved
        for b in backends:
            LoadView.record(b, 8, 1, 0.5)  # confirmed at 8 slots each
        fq.learn()
        fq.charge(uuid4(), 1000)
        fq.fleet_rows()
        fq.fleet_update([(DEMAND_KEY, MODEL, other, 50.0, 0.0)])
        fq._published[MODEL] = 50.0  # as if published at the last exchange: equal demand
        assert fq.quota(MODEL) == 7.0
        parts = fq._parts(MODEL, fq.quota(MODEL))
        assert sum(parts.values()) == 7.0 and sorted(parts.values()) == [3.0, 4.0]
        for url, part in parts.items():
            per_backend[url] += part
    assert per_backend == {URLS[0]: 7.0, URLS[1]: 7.0}, "one reserve slot left on each"


async def test_a_heavy_request_leaves_each_backend_its_share_of_the_reserve() -> None:
    """2 reserved of two 16-slot backends: one each. A heavy request does not take a
    backend's last slot while its peer has room: a light request that another node's view
    sent to that slot as the reserve waited a completion in the vLLM queue (2.9x its solo
    TTFT) while the peer had 3 free."""
    fq, backends = _setup(reserve=2)
    _poll_queued(fq, backends, slots=16)
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    _poll(fq, backends, [15, 13])
    assert not fq.has_room(backends[0], MODEL, flood), "its last slot is its share"
    assert fq.has_room(backends[0], MODEL, small)
    assert await fq.wait(flood, MODEL, 0, 100) is backends[1]
    assert await fq.wait(flood, MODEL, 0, 100) is backends[1], "down to its own share"
    third = (await _queued(fq, flood))[0]
    assert not third.done(), "one free slot left on each: the reserve"
    third.cancel()


async def test_with_more_backends_than_reserved_slots_the_reserve_stays_whole() -> None:
    """2 reserved of three 16-slot backends: a share of 2/3 each, which rounded down was 0
    everywhere, so a heavy request could take the last slot of any of them. The shares are
    whole slots that add up to the reserve (the odd ones to the first by id): 1, 1, 0."""
    urls = ("http://a:1", "http://b:1", "http://c:1")
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in urls], [ModelSpec(MODEL)])
    fq = FairQueue(pool, LoadView(pool), FairRules(reserve=2))
    backends = [b for u in urls if (b := pool.get(u)) is not None]
    _poll_queued(fq, backends, slots=16)
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    _poll(fq, backends, [15, 15, 15])  # one free on each: 3, of which 2 reserved
    assert [fq.has_room(b, MODEL, flood) for b in backends] == [False, False, True]
    assert await fq.wait(flood, MODEL, 0, 100) is backends[2]
    assert fq.has_room(backends[0], MODEL, small) and fq.has_room(backends[1], MODEL, small)
    second = (await _queued(fq, flood))[0]
    assert not second.done(), "one free slot left on a and b: the reserve"
    second.cancel()


async def test_a_peer_never_seen_queueing_is_taken_for_as_large_as_the_others() -> None:
    """Unlimited room on the idle peer of a flooded backend sent every node's spill there until
    it queued too; it is estimated at its peers' capacity, and the estimate grows while it
    runs full without a queue."""
    fq, backends = _setup(reserve=0)
    LoadView.record(backends[0], SLOTS, 3, 0.5)  # queued: 2 slots confirmed
    LoadView.record(backends[1], 0, 0, 0.0)  # never queued
    fq.learn()
    assert fq._cap(backends[1]) == SLOTS
    LoadView.record(backends[1], SLOTS, 0, 0.5)  # full at the estimate, no queue: a bigger one
    fq.learn()
    assert fq._cap(backends[1]) == SLOTS + 1


async def test_without_a_recent_exchange_the_split_is_equal() -> None:
    now = [0.0]
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    fq = FairQueue(
        pool, LoadView(pool), FairRules(reserve=0), clock=lambda: now[0], nodes=lambda: 2
    )
    backends = [b for u in URLS if (b := pool.get(u)) is not None]
    _saturate(fq, backends)
    fq.fleet_rows()
    fq.fleet_update([(DEMAND_KEY, MODEL, "node-b", 50.0, 0.0)])
    assert fq.quota(MODEL) == 1.0  # this node published no demand: one slot
    now[0] += 6.0  # the database went away: the exchange stopped
    assert fq.quota(MODEL) == 2.0, "half of the 4 slots"


async def test_a_flood_alone_in_the_queue_is_refused_429_when_others_are_served() -> None:
    """Small tenants pass at once through the reserve, so the flood is alone in the queue: it
    is still the one over its share (a 503 would blame the fleet)."""
    fq, backends = _setup(max_wait_s=0.05, reserve=1)
    _saturate(fq, backends)
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    _poll(fq, backends, [2, 2])
    with pytest.raises(QueueRefused) as refused:
        await fq.wait(flood, MODEL, 0, 100)
    assert refused.value.status == 429


def test_a_released_request_leaves_its_target_when_another_node_may_hold_the_last_slot() -> None:
    """Other nodes' requests since the last poll are not in this node's view: a request sent
    to the last slot another node had just taken waited a whole completion in the vLLM queue
    (0.6 s in the noisy demo, 17x its solo TTFT) while the backend that released it had room."""
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    target, released = [b for u in URLS if (b := pool.get(u)) is not None]

    def queue(nodes: int) -> FairQueue:
        fq = FairQueue(pool, LoadView(pool), FairRules(reserve=0), nodes=lambda: nodes)
        for b in (target, released):
            LoadView.record(b, 4, 1, 0.5)  # 4 slots, confirmed by a queue
        fq.learn()
        return fq

    fq, tenant = queue(nodes=2), uuid4()
    LoadView.record(target, 3, 0, 0.5)
    LoadView.record(released, 2, 0, 0.5)
    assert not fq.keeps_target(target, released, MODEL, tenant), "one slot, maybe already gone"
    LoadView.record(target, 2, 0, 0.5)
    assert fq.keeps_target(target, released, MODEL, tenant), "a slot to spare for the other node"
    LoadView.record(target, 3, 0, 0.5)
    LoadView.record(released, 3, 0, 0.5)
    assert not fq.keeps_target(target, released, MODEL, tenant), "a tie: this node's turn"
    three = queue(nodes=3)
    LoadView.record(target, 2, 0, 0.5)
    assert three.keeps_target(target, released, MODEL, tenant), "more room than released"
    LoadView.record(target, 4, 0, 0.5)
    assert not fq.keeps_target(target, released, MODEL, tenant), "no room at all"
    alone = queue(nodes=1)
    LoadView.record(target, 3, 0, 0.5)
    LoadView.record(released, 0, 0, 0.5)
    assert alone.keeps_target(target, released, MODEL, tenant), "a lone node sees every request"


async def test_two_nodes_that_each_see_one_slot_per_backend_send_light_requests_apart() -> None:
    """Each node takes the backends in its own turn (by node id): two light requests that
    arrive on two nodes within one poll, each seeing one free slot on each backend, go to
    different backends. In one order both went to the first, and one waited a whole
    completion in its vLLM queue."""
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    members = [b for u in URLS if (b := pool.get(u)) is not None]
    for b in members:
        LoadView.record(b, 4, 1, 0.5)  # 4 slots, confirmed by a queue
    nodes = {
        name: FairQueue(pool, LoadView(pool), FairRules(reserve=1), nodes=lambda: 2, node_id=name)
        for name in ("node-a", "node-b")
    }
    for name, fq in nodes.items():
        fq.learn()
        other = next(n for n in nodes if n != name)
        fq.fleet_update([(DEMAND_KEY, MODEL, other, 8.0, 0.0)])
    for b in members:
        LoadView.record(b, 3, 0, 0.5)  # one free slot on each, as both nodes' last poll read
    for fq in nodes.values():
        fq.learn()
    sent = [await fq.wait(uuid4(), MODEL, 0, 100) for fq in nodes.values()]
    assert None not in sent and sent[0] is not sent[1]


def test_the_probe_slot_of_an_estimated_backend_is_for_heavy_requests_only() -> None:
    """A backend never seen queueing is taken for one slot larger than the most it ran, so a
    larger one is found; a light request sent into that slot of a backend no larger waited a
    whole completion in the vLLM queue (0.19 s in the noisy demo against 35 ms solo)."""
    fq, backends = _setup(reserve=0)
    LoadView.record(backends[0], SLOTS, 3, 0.5)  # queued: 2 slots confirmed
    LoadView.record(backends[1], SLOTS, 0, 0.5)  # full at the peer's size, never queued
    fq.learn()
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    fq.learn()
    assert fq._cap(backends[1]) == SLOTS + 1
    assert fq.has_room(backends[1], MODEL, flood), "the probe: a heavy request finds the size"
    assert not fq.has_room(backends[1], MODEL, small), "not a light one"


def test_a_heavy_request_keeps_its_target_while_this_node_has_room_there() -> None:
    """The spare slot is for light requests: a heavy tenant's are counted against this node's
    quota on each backend, and sending them elsewhere only lost their cache."""
    fq, backends = _setup(reserve=0)
    fq._nodes = lambda: 2
    target, released = backends
    for b in backends:
        LoadView.record(b, 4, 1, 0.5)  # 4 slots each, confirmed
    flood, small = uuid4(), uuid4()
    fq.charge(flood, 1000)
    fq.charge(small, 10)
    fq.learn()
    LoadView.record(target, 3, 0, 0.5)
    LoadView.record(released, 2, 0, 0.5)
    assert fq.keeps_target(target, released, MODEL, flood)
    assert not fq.keeps_target(target, released, MODEL, small)
