"""End to end: the openai SDK against real nodes, real fake-vLLM backends, real Postgres."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import asyncpg
import openai
import pytest

from affinity_node.app import run_node
from affinity_node.http.state import METRICS_REGISTRY
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.store.keys import revoke_key
from tests.support.cluster import ALIAS, MODEL, cluster, node_config
from tests.support.waiting import wait_for

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about prefix caching."},
]


async def chat(client: openai.AsyncOpenAI, stream: bool, model: str = MODEL):
    """Returns (backend id, x-affinity, text) for one request."""
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=8
        )
        body = raw.parse()
        text = body.choices[0].message.content
        return raw.headers["x-backend-id"], raw.headers["x-affinity"], text
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=8, stream=True
    )
    text = []
    fingerprints = set()
    async for chunk in raw.parse():
        fingerprints.add(chunk.system_fingerprint)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    assert fingerprints == {raw.headers["x-backend-id"]}
    return raw.headers["x-backend-id"], raw.headers["x-affinity"], "".join(text)


async def test_one_pair_sticks_to_one_backend_across_nodes(dsn):
    async with cluster(dsn, nodes=3, backends=4) as c:
        secret = await c.new_key("alice")
        clients = [c.client(i, secret) for i in range(3)]
        results = await asyncio.gather(
            *(
                chat(clients[i % 3], stream=bool(i % 2), model=ALIAS if i % 5 == 0 else MODEL)
                for i in range(60)
            )
        )
        backends = {r[0] for r in results}
        assert len(backends) == 1, results
        affinity = [r[1] for r in results]
        assert affinity.count("miss") >= 1 and set(affinity) <= {"hit", "miss"}
        assert all(r[2] for r in results)
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT provider_url FROM api_key_model_affinity")
        finally:
            await conn.close()
        bound = c.backends[int(backends.pop()[1:])]
        assert [r["provider_url"] for r in rows] == [f"http://127.0.0.1:{bound.port}"]
        # A second key may land elsewhere, and also sticks.
        other = await c.new_key("bob")
        seen = {(await chat(c.client(i % 3, other), stream=False))[0] for i in range(9)}
        assert len(seen) == 1


def metric(node, name: str, **labels: str) -> float:
    return node.app[METRICS_REGISTRY].get_sample_value(name, labels or None) or 0.0


async def bound_row(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT provider_url FROM api_key_model_affinity")]
    finally:
        await conn.close()


async def test_bound_backend_dies_requests_are_served_and_the_binding_moves_everywhere(dsn):
    async with cluster(dsn, nodes=3, backends=3) as c:
        secret = await c.new_key("alice")
        clients = [c.client(i, secret) for i in range(3)]
        first_id, _, _ = await chat(clients[0], stream=False)
        for i in range(3):  # every node knows the binding
            await wait_for(lambda i=i: len(c.nodes[i].engine.cache) == 1, what="cached")
        dead = c.backends[int(first_id[1:])]
        await dead.close()

        # Served elsewhere at once; the binding moves once the node holds the backend
        # unhealthy (a request that fails there, or its health checks, eject it).
        seen: list[tuple[str, str]] = []

        async def rebound() -> bool:
            backend, affinity, text = await chat(clients[0], stream=True)
            assert backend != first_id and text
            seen.append((backend, affinity))
            return affinity == "rebind"

        await wait_for(rebound, timeout=5, interval=0.05, what="a request that rebinds")
        assert {a for _, a in seen[:-1]} <= {"spill"}, seen
        backend = seen[-1][0]
        new_url = f"http://127.0.0.1:{c.backends[int(backend[1:])].port}"
        await wait_for(lambda: bound_row(dsn), what="row readable")

        async def moved() -> bool:
            return await bound_row(dsn) == [new_url]

        await wait_for(moved, timeout=5, what="binding row moves to the backend that served")
        for i in range(3):
            await wait_for(
                lambda i=i: (
                    c.nodes[i].engine.cache.get((c.key_ids["alice"], MODEL)).backend == new_url
                ),
                timeout=2,
                what="peers follow the move",
            )
        # Every node now serves the pair from the new backend, none of these requests fail.
        results = await asyncio.gather(
            *(chat(clients[i % 3], stream=bool(i % 2)) for i in range(12))
        )
        assert {r[0] for r in results} == {backend}
        rebinds = sum(
            metric(c.nodes[0], "affinity_rebinds_total", model=MODEL, reason=r)
            for r in ("failover", "unhealthy")
        )
        assert rebinds == 1


async def test_revoked_key_is_refused_by_every_node_within_a_second(dsn):
    async with cluster(dsn, nodes=3, backends=2) as c:
        secret = await c.new_key("mallory")
        clients = [c.client(i, secret) for i in range(3)]
        for cl in clients:
            await chat(cl, stream=False)
        conn = await asyncpg.connect(dsn)
        try:
            assert await revoke_key(conn, c.key_ids["mallory"])
        finally:
            await conn.close()

        for cl in clients:

            async def refused(cl=cl) -> bool:
                try:
                    await cl.models.list()
                except openai.AuthenticationError:
                    return True
                return False

            await wait_for(refused, timeout=1.0, interval=0.02, what="401 after revocation")
        with pytest.raises(openai.AuthenticationError) as err:
            await chat(clients[1], stream=False)
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key"


async def test_postgres_stopped_requests_still_served_and_recover(dsn):
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with cluster(dsn, nodes=2, backends=3, node_dsn=proxy.dsn) as c:
            known = await c.new_key("known")
            fresh = await c.new_key("fresh")
            first, _, _ = await chat(c.client(0, known), stream=False)
            await wait_for(lambda: len(c.nodes[1].engine.cache) == 1, what="cached")
            # Both keys must be known to the nodes before the outage (keys live in Postgres).
            for i in range(2):
                for secret in (known, fresh):
                    await c.client(i, secret).models.list()

            await proxy.stop()
            for i in range(2):
                backend, affinity, _ = await chat(c.client(i, known), stream=bool(i))
                assert (backend, affinity) == (first, "hit")
                backend, affinity, _ = await chat(c.client(i, fresh), stream=False)
                assert affinity == "degraded"
            async with aiohttp.ClientSession() as http:
                for node in c.nodes:
                    async with http.get(f"{node.url}/readyz") as r:
                        assert r.status == 200
                        assert (await r.json())["database"] == "down"
            for node in c.nodes:
                await wait_for(
                    lambda node=node: metric(node, "affinity_db_up") == 0, what="db_up 0"
                )

            await proxy.start()
            for node in c.nodes:
                await wait_for(
                    lambda node=node: metric(node, "affinity_listener_up") == 1,
                    timeout=15,
                    what="listener back",
                )
            _, affinity, _ = await chat(c.client(1, fresh), stream=False)
            assert affinity == "miss"
            assert len(await bound_row(dsn)) == 2
            assert metric(c.nodes[1], "affinity_db_up") == 1
    finally:
        await proxy.close()


async def test_client_disconnect_mid_stream_cancels_the_upstream(dsn, caplog):
    slow = {"tokens_per_s": 20.0, "output_tokens": 400}
    async with cluster(dsn, nodes=1, backends=1, backend_cfg=slow) as c:
        secret = await c.new_key("alice")
        client = c.client(0, secret)
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        async for _chunk in stream:
            break
        await stream.close()
        backend = c.backends[0]
        await wait_for(
            lambda: backend.stats.disconnects == 1, timeout=5, what="backend sees the disconnect"
        )
        await wait_for(
            lambda: c.nodes[0].backends.backends[0].inflight == 0, what="in-flight released"
        )
        ours = [r for r in caplog.records if r.name.startswith(("affinity_node", "aiohttp"))]
        assert not [r for r in ours if r.levelno >= logging.WARNING or r.exc_info], [
            r.getMessage() for r in ours
        ]


async def admin_fail(url: str, body: dict) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/admin/fail", json=body) as r:
        assert r.status == 200


def no_health_rounds(cfg) -> None:
    """Health checks only at start: request failures alone decide health in these tests."""
    cfg.health.interval_seconds = 3600.0


async def test_5xx_before_the_first_byte_is_retried_once_elsewhere(dsn):
    async with cluster(dsn, nodes=1, backends=3, configure=no_health_rounds) as c:
        secret = await c.new_key("alice")
        client = c.client(0, secret)
        first, _, _ = await chat(client, stream=False)
        bound = c.backends[int(first[1:])]
        bound_id = f"http://127.0.0.1:{bound.port}"
        await admin_fail(bound.url, {"status": 503})
        rid = "req-retry-1"
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": rid}
        )
        assert raw.headers["x-request-id"] == rid
        # One failure does not make the backend unhealthy (eject after 2): served elsewhere,
        # the binding stays.
        assert raw.headers["x-affinity"] == "spill"
        assert raw.headers["x-backend-id"] != first
        assert await bound_row(dsn) == [bound_id]
        assert metric(c.nodes[0], "affinity_spills_total", model=MODEL, reason="failover") == 1
        # The second failure ejects it: this retry moves the binding to the backend that served.
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        assert raw.headers["x-affinity"] == "rebind"
        served = f"http://127.0.0.1:{c.backends[int(raw.headers['x-backend-id'][1:])].port}"

        async def moved() -> bool:
            return await bound_row(dsn) == [served]

        await wait_for(moved, timeout=5, what="the binding to move to the backend that served")
        assert (
            metric(c.nodes[0], "affinity_upstream_requests_total", backend=bound_id, code="503")
            == 2
        )
        # Every backend failing: one retry only, then a clean 502, no 500.
        for b in c.backends:
            await admin_fail(b.url, {"status": 500})
        with pytest.raises(openai.APIStatusError) as err:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert err.value.status_code == 502
        assert err.value.body["code"] == "upstream_error"


async def test_stream_broken_after_first_byte_ends_with_an_error_event(dsn):
    async with cluster(dsn, nodes=1, backends=2) as c:
        secret = await c.new_key("alice")
        client = c.client(0, secret)
        first, _, _ = await chat(client, stream=False)
        await admin_fail(c.backends[int(first[1:])].url, {"drop_after_chunks": 2})
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="backend stream broke"):
            async for chunk in stream:
                got.append(chunk)
        assert got, "the first chunks arrived before the break"


async def test_node_started_without_postgres_becomes_ready_when_keys_load(dsn):
    proxy = FaultProxy(dsn)
    await proxy.start()
    await proxy.stop()  # the port is known; nothing answers on it yet
    backend = await serve(FakeBackendConfig(backend_id="b0", models=[MODEL]))
    cfg = node_config(proxy.dsn, [backend], "late")
    cfg.database.startup_wait_seconds = 0.2
    try:
        async with run_node(cfg) as node, aiohttp.ClientSession() as http:

            async def readyz() -> dict:
                async with http.get(f"{node.url}/readyz") as r:
                    return {"status_code": r.status, **(await r.json())}

            state = await readyz()
            assert state["status_code"] == 503
            assert (state["status"], state["database"], state["listener"]) == (
                "keys_not_loaded",
                "down",
                "down",
            )
            await proxy.start()

            async def recovered() -> bool:
                state = await readyz()
                return (state["status_code"], state["listener"], state["database"]) == (
                    200,
                    "up",
                    "up",
                )

            await wait_for(recovered, timeout=15, what="ready once Postgres answers")
    finally:
        await backend.close()
        await proxy.close()


async def test_new_bindings_spread_evenly_over_backends(dsn):
    async with cluster(dsn, nodes=2, backends=3) as c:
        secrets = [await c.new_key(f"t{i}") for i in range(12)]
        for i, secret in enumerate(secrets):
            await chat(c.client(i % 2, secret), stream=False)
            for node in c.nodes:  # both nodes know every binding before the next choice
                await wait_for(
                    lambda node=node, n=i + 1: len(node.engine.cache) == n,
                    what="binding seen by both nodes",
                )
        counts: dict[str, int] = {}
        for url in await bound_row(dsn):
            counts[url] = counts.get(url, 0) + 1
        assert sorted(counts.values()) == [4, 4, 4], counts


async def test_overloaded_bound_backend_spills_without_moving_the_binding(dsn):
    slow = {"tokens_per_s": 10.0, "output_tokens": 30}
    # One backend per pair (no fan-out): the set is at its largest, so spilling is what's left.
    async with cluster(
        dsn, nodes=1, backends=3, backend_cfg=slow, spill_min_gap=2, max_fanout=1
    ) as c:
        secret = await c.new_key("busy")
        client = c.client(0, secret)
        first, _, _ = await chat(client, stream=False)
        streams = []
        try:
            for _ in range(6):  # each stays open: in flight on its backend until closed
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES, stream=True
                )
                streams.append(raw)
            served = [(r.headers["x-backend-id"], r.headers["x-affinity"]) for r in streams]
        finally:
            for raw in streams:
                await raw.parse().close()
        # 1.25 x the mean and at least 2 above it: the bound backend takes the first three,
        # then requests spill to the others while it is busy.
        assert [a for _, a in served[:3]] == ["hit"] * 3
        assert {b for b, _ in served[:3]} == {first}
        spilled = [b for b, a in served if a == "spill"]
        assert spilled and first not in spilled
        assert metric(c.nodes[0], "affinity_spills_total", model=MODEL, reason="load") == len(
            spilled
        )
        assert await bound_row(dsn) == [f"http://127.0.0.1:{c.backends[int(first[1:])].port}"]


async def test_after_the_bound_backend_dies_every_request_lands_on_one_backend(dsn):
    """A retry after a failed bound backend goes where the pair is rebound, on every node: the
    fleet warms one cache, not the retry target's and then the new binding's."""
    async with cluster(dsn, nodes=3, backends=4) as c:
        secret = await c.new_key("alice")
        clients = [c.client(i, secret) for i in range(3)]
        first_id, _, _ = await chat(clients[0], stream=False)
        for i in range(3):
            await wait_for(lambda i=i: len(c.nodes[i].engine.cache) == 1, what="cached")
        await c.backends[int(first_id[1:])].close()
        served = [(await chat(clients[i % 3], stream=bool(i % 2)))[0] for i in range(10)]
        assert first_id not in served
        assert len(set(served)) == 1, served
