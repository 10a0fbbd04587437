"""LoRA adapters end to end: fake vLLM backends serving adapters (some from the start, some
loaded and unloaded at runtime through vLLM's admin endpoints), 3 real nodes that learn them
from /v1/models, a real Postgres, the official `openai` SDK as the client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from affinity_node.app import run_node
from affinity_node.config import DiscoveryConfig, validate
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.store.registry import PostgresRegistry
from tests.support.cluster import MODEL, Cluster, node_config
from tests.support.waiting import wait_for

LORA = "sql-lora"
ON_TWO: tuple[Mapping[str, str | None], ...] = ({LORA: MODEL}, {LORA: MODEL}, {})
"""The adapter on backends b0 and b1, not on b2."""


@asynccontextmanager
async def lora_cluster(
    dsn: str, loras: Sequence[Mapping[str, str | None]] = ON_TWO, nodes: int = 3
) -> AsyncIterator[Cluster]:
    """Backends configured with the base model only (adapters are learned); nodes that ask
    every backend's /v1/models every 0.1 s."""
    async with AsyncExitStack() as stack:
        fakes = []
        for i, lora in enumerate(loras):
            fake = await serve(FakeBackendConfig(backend_id=f"b{i}", models=[MODEL], lora=lora))
            stack.push_async_callback(fake.close)
            fakes.append(fake)
        running = []
        for i in range(nodes):
            cfg = node_config(dsn, fakes, f"node-{i}")
            cfg.discovery = DiscoveryConfig(interval_seconds=0.1)
            validate(cfg)
            running.append(await stack.enter_async_context(run_node(cfg)))
        c = Cluster(dsn, running, fakes, stack)
        await everywhere(c, LORA, [f.url for f, lora in zip(fakes, loras, strict=True) if lora])
        yield c


async def everywhere(c: Cluster, model: str, urls: Sequence[str]) -> None:
    """Waits until every node's candidates for `model` are exactly `urls`."""
    for node in c.nodes:
        await wait_for(
            lambda node=node: set(node.backends.candidate_ids(model)) == set(urls),
            timeout=10.0,
            what=f"{model} on {urls} at {node.url}",
        )


async def lora_admin(url: str, action: str, **body: Any) -> None:
    """vLLM's runtime adapter endpoints: /v1/load_lora_adapter, /v1/unload_lora_adapter."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/{action}_lora_adapter", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def chat(client: openai.AsyncOpenAI, model: str, text: str) -> tuple[str, str]:
    """One chat completion: (backend that served, x-affinity)."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=4
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == model
    return raw.headers["x-backend-id"], raw.headers["x-affinity"]


async def bindings(dsn: str) -> dict[tuple[str, str], str]:
    """(key name, model) -> provider_url, as the table holds them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT k.name, b.model, b.provider_url FROM api_key_model_affinity b"
            " JOIN api_keys k ON k.id = b.api_key_id"
        )
    finally:
        await conn.close()
    return {(r["name"], r["model"]): r["provider_url"] for r in rows}


async def test_an_adapter_on_two_of_three_backends_is_served_only_there_one_per_key(dsn):
    async with lora_cluster(dsn) as c:
        served: dict[str, set[str]] = {}
        for k in range(4):
            secret = await c.new_key(f"tenant-{k}")
            clients = [c.client(i, secret) for i in range(3)]
            for turn in range(6):
                backend, affinity = await chat(clients[turn % 3], LORA, f"tenant {k} turn {turn}")
                assert affinity == ("miss" if turn == 0 else "hit"), (k, turn)
                served.setdefault(f"tenant-{k}", set()).add(backend)
        assert all(len(s) == 1 for s in served.values()), served  # sticks to one per key
        used = set().union(*served.values())
        assert used <= {"b0", "b1"}, served
        assert used == {"b0", "b1"}, served  # new bindings spread over the adapter's backends
        assert c.backends[2].stats.requests == 0  # b2 never saw a request: it has no adapter
        rows = await bindings(dsn)
        assert {model for _name, model in rows} == {LORA}
        assert {url for url in rows.values()} == {c.backends[0].url, c.backends[1].url}


async def test_an_adapters_binding_is_separate_from_its_base_models(dsn):
    async with lora_cluster(dsn) as c:
        secret = await c.new_key("tenant")
        client = c.client(0, secret)
        base, _ = await chat(client, MODEL, "base model first")
        lora, affinity = await chat(client, LORA, "then the adapter")
        assert affinity == "miss"  # the base model's binding does not answer for the adapter
        assert lora in {"b0", "b1"}
        rows = await bindings(dsn)
        assert set(rows) == {("tenant", MODEL), ("tenant", LORA)}
        base_url = rows[("tenant", MODEL)]

        # The adapter leaves its bound backend: its binding moves, the base model's stays.
        bound = c.backend_by_url(rows[("tenant", LORA)])
        other = next(b for b in c.backends[:2] if b is not bound)
        await lora_admin(bound.url, "unload", lora_name=LORA)
        await everywhere(c, LORA, [other.url])
        for i in range(3):
            moved, affinity = await chat(c.client(i, secret), LORA, f"after unload {i}")
            assert moved == other.backend.cfg.backend_id
            assert affinity == ("rebind" if i == 0 else "hit"), i
        for i in range(3):
            again, affinity = await chat(c.client(i, secret), MODEL, f"base again {i}")
            assert (again, affinity) == (base, "hit")
        rows = await bindings(dsn)
        assert rows == {("tenant", MODEL): base_url, ("tenant", LORA): other.url}


async def test_adapters_loaded_and_unloaded_at_runtime_follow_discovery(dsn):
    async with lora_cluster(dsn) as c:
        b0, b1, b2 = c.backends
        for k in range(2):  # one binding on each of b0 and b1
            secret = await c.new_key(f"early-{k}")
            await chat(c.client(k, secret), LORA, f"early {k}")
        assert {url for url in (await bindings(dsn)).values()} == {b0.url, b1.url}
        cache = c.nodes[2].engine.cache
        await wait_for(
            lambda: cache.bindings_of(b0.url) == cache.bindings_of(b1.url) == 1,
            what="node-2 to know both bindings",
        )

        await lora_admin(b2.url, "load", lora_name=LORA, lora_path="/adapters/sql")
        await everywhere(c, LORA, [b0.url, b1.url, b2.url])
        secret = await c.new_key("late")
        # New bindings go to the backend holding the fewest: b2, now that it lists the adapter.
        backend, affinity = await chat(c.client(2, secret), LORA, "late tenant")
        assert (backend, affinity) == ("b2", "miss")

        for fake in (b0, b1):
            await lora_admin(fake.url, "unload", lora_name=LORA)
        await everywhere(c, LORA, [b2.url])
        for k in range(2):
            secret = c.secrets[f"early-{k}"]
            for i in range(3):
                backend, _ = await chat(c.client(i, secret), LORA, f"early {k} after {i}")
                assert backend == "b2"

        await lora_admin(b2.url, "unload", lora_name=LORA)
        await everywhere(c, LORA, [])
        client = c.client(0, secret)
        with pytest.raises(openai.APIStatusError) as gone:
            await chat(client, LORA, "no backend lists it any more")
        assert gone.value.status_code == 503
        assert gone.value.body["code"] == "no_healthy_backend"  # type: ignore[index]
        # The base model is untouched by all of it.
        assert (await chat(client, MODEL, "base"))[0] in {"b0", "b1", "b2"}


async def test_unknown_adapters_are_404_and_adapters_on_down_backends_503(dsn):
    async with lora_cluster(dsn) as c:
        secret = await c.new_key("tenant")
        client = c.client(1, secret)
        with pytest.raises(openai.NotFoundError) as unknown:
            await chat(client, "never-listed-lora", "hello")
        assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]

        async with aiohttp.ClientSession() as session:
            for fake in c.backends[:2]:
                async with session.post(f"{fake.url}/admin/fail", json={"status": 503}) as r:
                    assert r.status == 200
        for node in c.nodes:
            await wait_for(
                lambda node=node: node.backends.candidate_ids(LORA) == (),
                what="b0 and b1 ejected",
            )
        with pytest.raises(openai.APIStatusError) as down:
            await chat(client, LORA, "both adapter backends are down")
        assert down.value.status_code == 503
        assert down.value.body["code"] == "no_healthy_backend"  # type: ignore[index]
        assert down.value.response.headers["retry-after"] == "1"
        assert (await chat(client, MODEL, "the base model still has b2"))[0] == "b2"


async def test_the_nodes_model_list_shows_adapters_with_their_parent(dsn):
    async with lora_cluster(dsn) as c:
        secret = await c.new_key("tenant")
        for i in range(3):
            listed = {m.id: m for m in (await c.client(i, secret).models.list()).data}
            assert set(listed) == {MODEL, LORA}
            assert listed[LORA].model_extra is not None
            assert listed[LORA].model_extra["parent"] == MODEL
            assert listed[MODEL].model_extra is not None
            assert listed[MODEL].model_extra["parent"] is None

        for fake in c.backends[:2]:
            await lora_admin(fake.url, "unload", lora_name=LORA)
        await everywhere(c, LORA, [])
        listed_after = [m.id for m in (await c.client(0, secret).models.list()).data]
        assert listed_after == [MODEL]


async def test_a_backend_listing_many_long_adapters_still_reports_its_health(db):
    """The registry's models column holds at most 64 names and 4000 bytes: a backend serving
    more (many adapters) is reported with as many as fit, never refused."""
    registry = PostgresRegistry(db)
    names = [f"{MODEL}-tenant-{i:03d}-" + "x" * 80 for i in range(100)]
    await registry.report_health("node-0", "http://127.0.0.1:9", True, "vllm", [MODEL, *names])
    (view,) = (await registry.health()).values()
    stored = list(view.models)
    assert stored and stored == sorted([MODEL, *names])[: len(stored)]
    assert len(" ".join(stored).encode()) <= 4000 and len(stored) <= 64
