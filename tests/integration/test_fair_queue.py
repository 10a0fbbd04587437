"""Fair queueing on a real cluster: 2 in-process nodes sharing one Postgres, 2 fake vLLM
backends of 2 slots each (a request runs 0.2 s), the openai SDK as the client.

A flooding tenant keeps 48 requests in flight (12x the fleet's 4 slots, spread over both
nodes); once the nodes see every backend saturated, a small tenant sends a few requests. With
fairness on, each of them starts in the slot kept in reserve for tenants under their fair share
(or waits for about one completion); with it off, it waits behind the flood's backlog in the
vLLM queues. The flood still gets everything the small tenant and the reserve leave."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai

from affinity_node.config import NodeConfig
from affinity_node.http.state import AFFINITY_METRICS, FAIRQ
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for

SLOTS = 2
SERVICE_S = 0.2  # 16 output tokens at 80 tokens/s
FLOOD_INFLIGHT = 48
SMALL_REQUESTS = 4
RESERVE = NodeConfig().fairness.reserve_slots
# Without fairness, the flood's queue on each backend before the small tenant starts: its
# requests then wait at least 8 x 0.2 s / 2 slots behind it, over the bound asserted below.
BACKLOG_PER_BACKEND = 8

BACKEND = {"max_running": SLOTS, "tokens_per_s": 80.0, "output_tokens": 16}


def _configure(enabled: bool) -> Any:
    def configure(cfg: NodeConfig) -> None:
        cfg.load.poll_interval_seconds = 0.1
        cfg.fairness.enabled = enabled
        cfg.fairness.max_wait_seconds = 20.0

    return configure


async def _flood(clients: list[openai.AsyncOpenAI], stop: asyncio.Event, done: list[float]) -> None:
    """FLOOD_INFLIGHT requests in flight until `stop`, each replaced when it ends."""

    async def worker(i: int) -> None:
        client = clients[i % len(clients)]
        while not stop.is_set():
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"flood {i}"}], max_tokens=16
            )
            done.append(time.monotonic())

    await asyncio.gather(*(worker(i) for i in range(FLOOD_INFLIGHT)))


async def _small_latencies(c: Cluster, enabled: bool) -> tuple[list[float], float]:
    flood_secret = await c.new_key("flood")
    small_secret = await c.new_key("small")
    flood_clients = [c.client(i, flood_secret) for i in range(2)]
    small = c.client(0, small_secret)
    stop = asyncio.Event()
    flood_done: list[float] = []
    flood = asyncio.create_task(_flood(flood_clients, stop, flood_done))
    try:
        # With fairness on the flood runs in every slot but the reserve's (kept free between
        # polls too) and its excess queues in vLLM or the nodes. With it off the flood takes
        # every slot, and only once fan-out has spread it over both backends does a backlog
        # wait in each vLLM queue: before that the small tenant's backend may still be idle.
        def saturated() -> bool:
            engines = [b.backend.engine for b in c.backends]
            if len(flood_done) < 8:
                return False
            if enabled:
                return sum(e.running for e in engines) >= 2 * SLOTS - RESERVE
            return all(e.running == SLOTS and e.waiting >= BACKLOG_PER_BACKEND for e in engines)

        await wait_for(saturated, timeout=15.0, what="the flood saturating the fleet")
        if enabled:
            await wait_for(
                lambda: all(MODEL in n.app[FAIRQ].busy for n in c.nodes),
                timeout=5.0,
                what="every node seeing the model saturated",
            )
            # What the flood sent before that sits in the vLLM queues (no node can recall
            # it); once it has run, the flood's excess waits in the nodes instead.
            await wait_for(
                lambda: (
                    sum(b.backend.engine.waiting for b in c.backends) <= 1
                    and sum(n.app[FAIRQ].depth(MODEL) for n in c.nodes) > 0
                ),
                timeout=15.0,
                what="the flood's backlog moved from the vLLM queues to the nodes' queues",
            )
        latencies = []
        started, before = time.monotonic(), len(flood_done)
        for i in range(SMALL_REQUESTS):
            t0 = time.monotonic()
            await small.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"small {i}"}], max_tokens=16
            )
            latencies.append(time.monotonic() - t0)
        flood_rate = (len(flood_done) - before) / (time.monotonic() - started)
    finally:
        stop.set()
        await asyncio.wait_for(flood, timeout=30.0)
    return latencies, flood_rate


async def test_flood_does_not_starve_a_small_tenant(dsn: str) -> None:
    async with cluster(
        dsn, nodes=2, backends=2, backend_cfg=BACKEND, configure=_configure(True)
    ) as c:
        latencies, flood_rate = await _small_latencies(c, enabled=True)
        # One completion frees a slot every SERVICE_S / 4 on average; the small request takes
        # the next one, then runs SERVICE_S: far below the flood's backlog (48 / 4 x 0.2 s).
        backlog_s = FLOOD_INFLIGHT / (2 * SLOTS) * SERVICE_S
        assert max(latencies) < backlog_s / 3, (latencies, backlog_s)
        waited = sum(n.app[AFFINITY_METRICS].queue_wait.labels(MODEL)._sum.get() for n in c.nodes)
        assert waited > 0, "the flood's requests queued in the nodes, not in vLLM"
        # Work-conserving but for the reserve: while requests queued in the nodes, every other
        # slot kept working: the flood got the fleet's capacity (4 slots / 0.2 s) less the
        # small tenant's one slot and the reserved one.
        capacity = 2 * SLOTS / SERVICE_S
        assert flood_rate >= 0.8 * (capacity - 2 / SERVICE_S), (flood_rate, capacity)
        await wait_for(
            lambda: all(n.app[FAIRQ].depth(MODEL) == 0 for n in c.nodes),
            timeout=10.0,
            what="queues drained after the flood stopped",
        )


async def test_without_fairness_the_small_tenant_waits_behind_the_flood(dsn: str) -> None:
    """The same run with fairness off: what the queue fixes (vLLM serves first come first)."""
    async with cluster(
        dsn, nodes=2, backends=2, backend_cfg=BACKEND, configure=_configure(False)
    ) as c:
        latencies, _ = await _small_latencies(c, enabled=False)
        backlog_s = FLOOD_INFLIGHT / (2 * SLOTS) * SERVICE_S
        # Its requests queue behind the flood's on its bound backend (the flood spills there).
        assert sorted(latencies)[len(latencies) // 2] > backlog_s / 3, (latencies, backlog_s)
