"""The simulator's capacity model: slots and FIFO, processor-sharing prefill, decode slowdown,
KV usage. The pure parts are driven with explicit times; the engine runs on a virtual clock
(tests/unit/virtual_time.py), so every time below is exact."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affinity_node.sim.capacity import CapacityModel, Engine, PrefillPool, Scheduler, Ticket
from tests.unit.virtual_time import run_virtual

# -- the model's arithmetic ------------------------------------------------------------------


def test_decode_step_grows_linearly_with_the_batch():
    model = CapacityModel(decode_tokens_per_s=1000.0, decode_slowdown=0.05)
    assert model.decode_step_s(1) == pytest.approx(0.001)
    assert model.decode_step_s(0) == pytest.approx(0.001)  # never faster than alone
    assert model.decode_step_s(11) == pytest.approx(0.001 * 1.5)
    assert CapacityModel(decode_slowdown=0.0).decode_step_s(64) == CapacityModel().decode_step_s(1)


def test_blocks_and_prefill_seconds():
    model = CapacityModel(prefill_s_per_token=0.001, block_size=16)
    assert [model.blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    assert model.prefill_s(250) == pytest.approx(0.25)
    assert model.prefill_s(-3) == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        {"max_running": 0},
        {"prefill_s_per_token": -1.0},
        {"decode_tokens_per_s": 0.0},
        {"decode_slowdown": -0.1},
        {"kv_cache_blocks": 0},
    ],
)
def test_nonsense_is_refused(bad):
    with pytest.raises(ValueError):
        CapacityModel(**bad)


# -- slots, FIFO, KV blocks ------------------------------------------------------------------


def tickets(*blocks: int) -> list[Ticket]:
    return [Ticket(b, label=f"r{i}") for i, b in enumerate(blocks)]


def test_slots_fill_then_the_queue_is_served_first_come_first_served():
    s = Scheduler(max_running=2, kv_cache_blocks=100)
    a, b, c, d = tickets(1, 1, 1, 1)
    assert s.submit(a, 0.0) == [a]
    assert s.submit(b, 0.1) == [b]
    assert s.submit(c, 0.2) == []
    assert s.submit(d, 0.3) == []
    assert list(s.waiting) == [c, d] and s.running == {a, b}
    assert s.finish(b, 1.0) == [c]
    assert c.arrival == 0.2 and c.admitted_at == 1.0
    assert s.finish(a, 1.5) == [d]
    assert not s.waiting


def test_kv_blocks_gate_admission_and_the_head_is_never_overtaken():
    s = Scheduler(max_running=10, kv_cache_blocks=10)
    big, huge, small = tickets(6, 5, 1)
    assert s.submit(big, 0.0) == [big]
    assert s.kv_usage == pytest.approx(0.6)
    assert s.submit(huge, 0.0) == []  # 6 + 5 > 10
    assert s.submit(small, 0.0) == []  # would fit, but waits behind the head (FIFO)
    assert s.finish(big, 1.0) == [huge, small]
    assert s.kv_usage == pytest.approx(0.6)


def test_a_request_larger_than_the_cache_runs_alone():
    s = Scheduler(max_running=4, kv_cache_blocks=10)
    (giant,) = tickets(25)
    assert s.submit(giant, 0.0) == [giant]
    assert s.kv_usage == pytest.approx(2.5)
    (other,) = tickets(1)
    assert s.submit(other, 0.0) == []


def test_abandon_leaves_the_queue_or_frees_the_slot():
    s = Scheduler(max_running=1, kv_cache_blocks=100)
    a, b, c = tickets(1, 1, 1)
    s.submit(a, 0.0)
    s.submit(b, 0.0)
    s.submit(c, 0.0)
    assert s.abandon(b, 0.5) == []  # left the queue; c still waits for the slot
    assert list(s.waiting) == [c]
    assert s.abandon(a, 0.6) == [c]  # a running client went away: c gets its slot
    assert s.abandon(a, 0.7) == []  # twice is harmless
    assert s.running == {c} and s.used_blocks == 1


# -- processor-sharing prefill ----------------------------------------------------------------


def test_a_lone_prefill_takes_its_work():
    pool = PrefillPool()
    pool.add("a", 0.5, now=0.0)
    assert pool.next_finish() == pytest.approx(0.5)
    assert pool.advance(0.4) == []
    assert pool.remaining_s("a") == pytest.approx(0.1)
    assert pool.advance(0.5) == ["a"]
    assert len(pool) == 0 and pool.next_finish() is None


def test_k_prefills_each_progress_at_one_kth():
    pool = PrefillPool()
    pool.add("short", 1.0, now=0.0)
    pool.add("long", 2.0, now=0.0)
    # Both at half speed: short is done after 2 s, long has 1 s left and then runs alone.
    assert pool.next_finish() == pytest.approx(2.0)
    assert pool.advance(1.999) == []
    assert pool.advance(2.0) == ["short"]
    assert pool.remaining_s("long") == pytest.approx(1.0)
    assert pool.next_finish() == pytest.approx(3.0)
    assert pool.advance(10.0) == ["long"]


def test_a_late_arrival_slows_the_ones_already_prefilling():
    pool = PrefillPool()
    pool.add("a", 1.0, now=0.0)
    pool.add("b", 1.0, now=0.5)  # a has 0.5 s left, now at half speed
    assert pool.next_finish() == pytest.approx(1.5)
    assert pool.advance(1.5) == ["a"]
    assert pool.next_finish() == pytest.approx(2.0)  # b: 0.5 s done while shared, 0.5 alone


def test_one_advance_over_several_finishes_is_exact():
    pool = PrefillPool()
    for name, work in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        pool.add(name, work, now=0.0)
    # a at 3 s (3 sharing), b at 3 + 2*1 = 5 s, c at 5 + 1 = 6 s.
    assert pool.advance(100.0) == ["a", "b", "c"]
    pool.add("d", 1.0, now=100.0)
    assert pool.next_finish() == pytest.approx(101.0)


def test_a_removed_prefill_gives_its_share_back():
    pool = PrefillPool()
    pool.add("a", 1.0, now=0.0)
    pool.add("gone", 5.0, now=0.0)
    pool.remove("gone", now=1.0)  # a got 0.5 s in the first second
    assert "gone" not in pool
    assert pool.next_finish() == pytest.approx(1.5)


def finish_times(jobs: list[tuple[float, float]]) -> dict[Hashable, float]:
    """Drives a pool event by event over (arrival, work) jobs: {job index: finish time}."""
    pool = PrefillPool()
    out: dict[Hashable, float] = {}
    pending = sorted(enumerate(jobs), key=lambda item: item[1][0])
    while pending or len(pool):
        nxt = pool.next_finish()
        if pending and (nxt is None or pending[0][1][0] <= nxt):
            i, (at, work) = pending.pop(0)
            out.update(dict.fromkeys(pool.add(i, work, now=at), at))
        else:
            assert nxt is not None
            out.update(dict.fromkeys(pool.advance(nxt), nxt))
    return out


@given(st.lists(st.floats(0.01, 5.0), min_size=1, max_size=12))
def test_simultaneous_prefills_finish_as_processor_sharing_says(works):
    # n jobs from 0: the shortest ends at n*w1, then each next one after (n-i)*(w_i - w_i-1).
    got = finish_times([(0.0, w) for w in works])
    expected, t, prev = {}, 0.0, 0.0
    order = sorted(range(len(works)), key=lambda i: works[i])
    for rank, i in enumerate(order):
        t += (works[i] - prev) * (len(works) - rank)
        prev = works[i]
        expected[i] = t
    assert got == pytest.approx(expected)


@given(st.lists(st.tuples(st.floats(0.0, 10.0), st.floats(0.01, 3.0)), min_size=1, max_size=12))
def test_prefill_sharing_wastes_no_compute(jobs):
    """Work-conserving: the last prefill ends when one-at-a-time service would end too."""
    got = finish_times(jobs)
    t = 0.0
    for at, work in sorted(jobs):
        t = max(t, at) + work
    assert max(got.values()) == pytest.approx(t)
    assert all(got[i] >= at + work - 1e-6 for i, (at, work) in enumerate(jobs))


def test_no_work_finishes_at_once():
    pool = PrefillPool()
    pool.add("a", 1.0, now=0.0)
    assert pool.add("free", 0.0, now=0.2) == []
    assert pool.advance(0.2) == ["free"]


# -- the engine on the event loop (virtual time) ----------------------------------------------


async def prefill_request(
    engine: Engine, finished: dict[str, float], name: str, tokens: int, at: float = 0.0
) -> None:
    """A request that only prefills: waits `at`, takes a slot, records when it is done."""
    await asyncio.sleep(at)
    async with engine.slot(tokens, 0, "m"):
        await engine.prefill(tokens)
        finished[name] = asyncio.get_running_loop().time()


def test_engine_queues_beyond_its_slots_and_shares_prefill():
    model = CapacityModel(max_running=2, prefill_s_per_token=0.001, kv_cache_blocks=1000)
    done: dict[str, float] = {}
    seen_waiting: list[int] = []

    async def main() -> None:
        engine = Engine(model, on_change=lambda: seen_waiting.append(engine.waiting))
        await asyncio.gather(
            prefill_request(engine, done, "a", 1000),
            prefill_request(engine, done, "b", 2000),
            prefill_request(engine, done, "c", 1000, at=0.5),
        )
        assert engine.running == 0 and engine.waiting == 0 and engine.kv_usage == 0

    run_virtual(main())
    # a and b share from 0: a done at 2.0 (1 s of work at half speed). c waited for a's slot
    # from 0.5 to 2.0, then shares with b (1 s left each): both done at 4.0.
    assert done == pytest.approx({"a": 2.0, "b": 4.0, "c": 4.0})
    assert max(seen_waiting) == 1


def test_engine_gauges_by_label_and_kv_usage():
    model = CapacityModel(max_running=1, kv_cache_blocks=10, block_size=16)

    async def main() -> None:
        engine = Engine(model)
        release = asyncio.Event()

        async def hold(label: str) -> None:
            async with engine.slot(100, 12, label):  # 112 tokens: 7 blocks
                await release.wait()

        tasks = [asyncio.create_task(hold("m1")), asyncio.create_task(hold("m2"))]
        await asyncio.sleep(0.1)
        assert (engine.running_with("m1"), engine.waiting_with("m2")) == (1, 1)
        assert engine.running_with("m2") == 0
        assert engine.kv_usage == pytest.approx(0.7)
        release.set()
        await asyncio.gather(*tasks)
        assert engine.kv_usage == 0

    run_virtual(main())


def test_a_cancelled_waiter_leaves_the_queue():
    model = CapacityModel(max_running=1, prefill_s_per_token=0.001)
    finished: dict[str, float] = {}

    async def main() -> None:
        engine = Engine(model)
        first = asyncio.create_task(prefill_request(engine, finished, "first", 1000))
        queued = asyncio.create_task(prefill_request(engine, finished, "queued", 1000))
        await asyncio.sleep(0.25)
        assert engine.waiting == 1
        queued.cancel()
        await asyncio.sleep(0)
        assert engine.waiting == 0
        await first
        assert engine.running == 0

    run_virtual(main())
    assert finished == pytest.approx({"first": 1.0})


def test_a_cancelled_prefill_gives_its_share_back():
    model = CapacityModel(max_running=4, prefill_s_per_token=0.001)
    finished: dict[str, float] = {}

    async def main() -> None:
        engine = Engine(model)
        keep = asyncio.create_task(prefill_request(engine, finished, "keep", 1000))
        gone = asyncio.create_task(prefill_request(engine, finished, "gone", 5000))
        await asyncio.sleep(1.0)  # keep has had 0.5 s of compute
        gone.cancel()
        await keep
        assert engine.running == 0 and len(engine.pool) == 0

    run_virtual(main())
    assert finished == pytest.approx({"keep": 1.5})


def test_decode_steps_follow_the_running_batch():
    model = CapacityModel(max_running=8, decode_tokens_per_s=100.0, decode_slowdown=0.5)

    async def main() -> None:
        engine = Engine(model)
        assert engine.decode_step_s() == pytest.approx(0.01)
        gate = asyncio.Event()

        async def hold() -> None:
            async with engine.slot(1, 1):
                await gate.wait()

        tasks = [asyncio.create_task(hold()) for _ in range(3)]
        await asyncio.sleep(0)
        assert engine.decode_step_s() == pytest.approx(0.01 * (1 + 0.5 * 2))
        gate.set()
        await asyncio.gather(*tasks)

    run_virtual(main())
