"""Load-aware fan-out across real nodes sharing one Postgres: a set grows once however many
nodes decide, every node sends a conversation to the same member, a set shrinks back when the
load stops, a restarted node keeps the sets, and real overload makes a set grow."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import openai

from affinity_node.app import run_node
from affinity_node.config import NodeConfig
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.fanout import FanoutController, FanoutRules
from affinity_node.routing.load_view import LoadView
from tests.support.cluster import MODEL, cluster, node_config
from tests.support.nodes import BACKENDS, new_key, nodes
from tests.support.waiting import wait_for
from tests.unit.fakes import Clock

MESSAGES = [{"role": "user", "content": "hello"}]


async def row(dsn: str) -> tuple[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        r = await conn.fetchrow("SELECT provider_url, fanout_urls FROM api_key_model_affinity")
    finally:
        await conn.close()
    assert r is not None
    return r[0], list(r[1])


async def set_fanout(dsn: str, members: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE api_key_model_affinity SET fanout_urls = $1", members)
    finally:
        await conn.close()


async def test_three_nodes_deciding_at_once_grow_the_set_once_and_all_follow(dsn, db):
    key = await new_key(db)
    clock = Clock()
    async with nodes(dsn, 3) as fleet:
        controllers = []
        for n in fleet:
            pool = BackendPool(
                [BackendSpec(b, models=[MODEL]) for b in BACKENDS], [ModelSpec(MODEL)]
            )
            view = LoadView(pool)
            for backend, waiting in zip(pool.backends, (9, 0, 0), strict=True):
                view.record(backend, 4, waiting, 0.5)
            view.classify()
            controllers.append(
                FanoutController(n.engine, view, pool, FanoutRules(grow_after_s=1.0), clock)
            )
        first = await fleet[0].engine.resolve(key, MODEL, BACKENDS, lambda c: BACKENDS[0])
        for n in fleet[1:]:
            await wait_for(lambda n=n: n.engine.cache.get((key, MODEL)) is not None)
        results = [await n.engine.resolve(key, MODEL, BACKENDS, lambda c: c[0]) for n in fleet]
        for c, res in zip(controllers, results, strict=True):
            c.observe((key, MODEL), res)
        clock.advance(1.5)
        for c, res in zip(controllers, results, strict=True):  # together, same version
            c.observe((key, MODEL), res)
        await asyncio.gather(*(c.stop() for c in controllers))
        provider, members = await row(dsn)
        assert provider == first.backend and len(members) == 1
        for n in fleet:
            await wait_for(
                lambda n=n: n.engine.cache.get((key, MODEL)).fanout == tuple(members),
                what="every node to hear of the new member",
            )


async def chat_on(client: openai.AsyncOpenAI, conversation: str) -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        extra_body={"prompt_cache_key": conversation},
    )
    return raw.headers["x-backend-id"]


async def test_every_node_sends_a_conversation_to_the_same_member(dsn):
    async with cluster(dsn, nodes=3, backends=3) as c:
        secret = await c.new_key("alice")
        clients = [c.client(i, secret) for i in range(3)]
        await chat_on(clients[0], "warm-up")
        provider, _ = await row(dsn)
        others = [b.url for b in c.backends if b.url != provider]
        await set_fanout(dsn, others)
        for node in c.nodes:
            await wait_for(
                lambda node=node: (
                    len(node.engine.cache.get((c.key_ids["alice"], MODEL)).fanout) == 2
                ),
                what="the set everywhere",
            )
        seen: dict[str, str] = {}
        for i in range(30):
            served = {await chat_on(cl, f"conversation-{i}") for cl in clients}
            assert len(served) == 1, (i, served)  # the same member from every node
            seen[f"conversation-{i}"] = served.pop()
        assert len(set(seen.values())) == 3  # and conversations spread over the set


def fast_fanout(cfg: NodeConfig) -> None:
    cfg.load.poll_interval_seconds = 0.2
    cfg.affinity.fanout_grow_after_seconds = 0.3
    cfg.affinity.fanout_shrink_after_seconds = 0.5


async def test_a_set_shrinks_back_when_the_load_stops(dsn):
    async with cluster(dsn, nodes=2, backends=3, configure=fast_fanout) as c:
        secret = await c.new_key("alice")
        await chat_on(c.client(0, secret), "one")
        provider, _ = await row(dsn)
        await set_fanout(dsn, [b.url for b in c.backends if b.url != provider])

        async def shrunk() -> bool:
            return await row(dsn) == (provider, [])

        # Idle backends are cool: the newest member goes, then the next.
        await wait_for(shrunk, timeout=15, what="the set to shrink to one backend")
        for node in c.nodes:
            await wait_for(
                lambda node=node: node.engine.cache.get((c.key_ids["alice"], MODEL)).fanout == (),
                what="every node to follow",
            )
        reg = c.nodes[0].metrics_registry
        shrinks = sum(
            n.metrics_registry.get_sample_value(
                "affinity_fanout_changes_total",
                {"model": MODEL, "direction": "shrink", "reason": "cool"},
            )
            or 0
            for n in c.nodes
        )
        assert shrinks == 2
        assert (
            reg.get_sample_value("affinity_backend_load", {"backend": provider, "kind": "running"})
            is not None
        )


async def test_a_restarted_node_keeps_the_sets(dsn):
    async with cluster(dsn, nodes=1, backends=3) as c:
        secret = await c.new_key("alice")
        await chat_on(c.client(0, secret), "one")
        provider, _ = await row(dsn)
        members = [b.url for b in c.backends if b.url != provider]
        await set_fanout(dsn, members)
        pair = (c.key_ids["alice"], MODEL)
        await wait_for(
            lambda: c.nodes[0].engine.cache.get(pair).fanout == tuple(members), what="the set"
        )
        expected = {f"conv-{i}": await chat_on(c.client(0, secret), f"conv-{i}") for i in range(10)}
        cfg = node_config(dsn, c.backends, "node-restarted")
        async with run_node(cfg) as fresh:
            # It serves while its snapshot loads; once loaded, the set is in its cache.
            await wait_for(lambda: fresh.engine.sync_status.state == "done", what="snapshot")
            assert fresh.engine.cache.get((c.key_ids["alice"], MODEL)).fanout == tuple(members)
            client = openai.AsyncOpenAI(base_url=f"{fresh.url}/v1", api_key=secret, max_retries=0)
            try:
                for conv, backend in expected.items():
                    assert await chat_on(client, conv) == backend
            finally:
                await client.close()


async def test_real_overload_grows_the_set_and_spreads_the_tenant(dsn):
    slow: dict[str, Any] = {"tokens_per_s": 20.0, "output_tokens": 30, "max_running": 2}

    def config(cfg: NodeConfig) -> None:
        fast_fanout(cfg)
        cfg.affinity.fanout_shrink_after_seconds = 3600.0

    async with cluster(dsn, nodes=2, backends=3, backend_cfg=slow, configure=config) as c:
        secret = await c.new_key("busy")
        clients = [c.client(i % 2, secret, timeout=60.0) for i in range(2)]
        await chat_on(clients[0], "first")

        async def hot_tenant(i: int) -> None:
            while True:  # a hot tenant's traffic does not stop: the queue stays
                s = await clients[i % 2].chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    stream=True,
                    extra_body={"prompt_cache_key": f"c{i}"},
                )
                async for _ in s:
                    pass

        # Two run, six wait: the bound backend queues, as its own /metrics say.
        load = [asyncio.create_task(hot_tenant(i)) for i in range(8)]
        try:

            async def grown() -> bool:
                # A request arriving meanwhile is where a node notices (not waiting for it).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(chat_on(clients[0], "probe"), 0.2)
                return len((await row(dsn))[1]) >= 1

            await wait_for(grown, timeout=30, interval=0.1, what="the hot set to grow")
        finally:
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
        served = {await chat_on(clients[0], f"after-{i}") for i in range(20)}
        assert len(served) >= 2  # the tenant now runs on more than one backend
