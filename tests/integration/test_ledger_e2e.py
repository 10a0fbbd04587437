"""The usage ledger end to end: the openai SDK against several real nodes and fake vLLM
backends. What the ledger holds is what the clients were told (and, for streams whose client
did not ask for usage, what the backends counted); clients get the very stream vLLM sends; a
database outage fails no request and loses no count."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from affinity_node.config import NodeConfig
from affinity_node.http.state import METRICS_REGISTRY
from affinity_node.ledger.ports import COUNT_COLUMNS
from affinity_node.sim.faultproxy import FaultProxy
from tests.support.cluster import ALIAS, MODEL, Cluster, cluster
from tests.support.waiting import wait_for

SYSTEM = "You are the assistant of a tenant with a long, fixed set of instructions. " * 8


def fast_ledger(cfg: NodeConfig) -> None:
    cfg.ledger.flush_interval_seconds = 0.1


@dataclass
class Seen:
    """What one key's clients were told."""

    requests: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    with_usage: int = 0
    backends: Counter[str] = field(default_factory=Counter)
    headers: Counter[str] = field(default_factory=Counter)


async def ask(
    client: openai.AsyncOpenAI, seen: Seen, how: str, turn: int, model: str = MODEL
) -> None:
    """One request; `how`: chat | completion (not streamed), stream (usage asked) or silent
    (streamed, usage not asked: the client must see none)."""
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Question number {turn % 3}: what is a prefix cache?"},
    ]
    usage: Any = None
    if how == "chat":
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=6
        )
        usage = raw.parse().usage
    elif how == "completion":
        raw = await client.completions.with_raw_response.create(
            model=model, prompt=SYSTEM + f" Continue {turn % 2}:", max_tokens=6
        )
        usage = raw.parse().usage
    else:
        options = {"include_usage": True} if how == "stream" else None
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=6, stream=True, stream_options=options
        )
        chunks = [chunk async for chunk in raw.parse()]
        usages = [c.usage for c in chunks if c.usage is not None]
        if how == "silent":
            assert usages == [] and all(c.choices for c in chunks), (
                "usage the client never asked for"
            )
        else:
            assert len(usages) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
            usage = usages[0]
    seen.requests += 1
    seen.backends[raw.headers["x-backend-id"]] += 1
    seen.headers[raw.headers["x-affinity"]] += 1
    if usage is not None:
        seen.with_usage += 1
        seen.prompt += usage.prompt_tokens
        seen.cached += usage.prompt_tokens_details.cached_tokens
        seen.completion += usage.completion_tokens


async def ledger_by_key(dsn: str) -> dict[uuid.UUID, dict[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        cols = ", ".join(f"sum({c})::bigint AS {c}" for c in COUNT_COLUMNS)
        rows = await conn.fetch(f"SELECT api_key_id, {cols} FROM usage_ledger GROUP BY 1")
        return {r["api_key_id"]: {c: r[c] for c in COUNT_COLUMNS} for r in rows}
    finally:
        await conn.close()


async def ledger_backends(dsn: str) -> dict[tuple[uuid.UUID, str], int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT api_key_id, backend, sum(requests)::bigint FROM usage_ledger GROUP BY 1, 2"
        )
        return {(r[0], r[1]): r[2] for r in rows}
    finally:
        await conn.close()


async def backend_cache_counts(c: Cluster) -> tuple[float, float]:
    """(prompt tokens queried, tokens found) over every backend, from their own /metrics."""
    queried = found = 0.0
    async with aiohttp.ClientSession() as http:
        for b in c.backends:
            async with http.get(f"{b.url}/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("vllm:prefix_cache_queries_total"):
                        queried += float(line.split()[-1])
                    elif line.startswith("vllm:prefix_cache_hits_total"):
                        found += float(line.split()[-1])
    return queried, found


def backend_url(c: Cluster, backend_id: str) -> str:
    return f"http://127.0.0.1:{c.backends[int(backend_id[1:])].port}"


async def test_the_ledger_holds_what_clients_received_across_nodes(dsn):
    async with cluster(dsn, nodes=3, backends=3, configure=fast_ledger) as c:
        plan = {"plain": ("chat", "completion"), "asks": ("stream",), "silent": ("silent",)}
        plan["mixed"] = ("chat", "stream", "silent", "completion")
        seen = {name: Seen() for name in plan}
        secrets = {name: await c.new_key(name) for name in plan}
        clients = {name: [c.client(i, secrets[name]) for i in range(3)] for name in plan}

        async def tenant(name: str) -> None:
            for turn in range(12):  # one at a time: the turns after the first find the cache
                how = plan[name][turn % len(plan[name])]
                model = ALIAS if turn == 5 else MODEL  # an alias is ledgered canonically
                await ask(clients[name][turn % 3], seen[name], how, turn, model)

        await asyncio.gather(*(tenant(name) for name in plan))
        total_requests = sum(s.requests for s in seen.values())

        async def all_flushed() -> bool:
            led = await ledger_by_key(dsn)
            return sum(r["requests"] for r in led.values()) == total_requests

        await wait_for(all_flushed, timeout=10, what="every request in the ledger")
        led = await ledger_by_key(dsn)
        for name, s in seen.items():
            row = led[c.key_ids[name]]
            outcomes = sum(row[col] for col in COUNT_COLUMNS[4:])
            assert row["requests"] == outcomes == s.requests, name
            assert row["hit_requests"] + row["fanout_requests"] == s.headers["hit"], name
            assert row["miss_requests"] == s.headers["miss"] >= 1, name
            if s.with_usage == s.requests:  # clients got every usage: the sums are theirs
                assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
                    s.prompt,
                    s.cached,
                    s.completion,
                ), name
                assert s.cached > 0, name
        assert seen["silent"].with_usage == 0
        # The streams whose clients saw no usage are ledgered too: every prompt token the
        # backends counted, and every token they found in their caches, is in the ledger.
        queried, found = await backend_cache_counts(c)
        assert sum(r["prompt_tokens"] for r in led.values()) == queried
        assert sum(r["cached_tokens"] for r in led.values()) == found
        assert led[c.key_ids["silent"]]["cached_tokens"] > 0
        # Each request under the backend that served it (the x-backend-id clients saw).
        per_backend = await ledger_backends(dsn)
        expected = {
            (c.key_ids[name], backend_url(c, b)): n
            for name, s in seen.items()
            for b, n in s.backends.items()
        }
        assert per_backend == expected
        for node in c.nodes:
            registry = node.app[METRICS_REGISTRY]
            assert registry.get_sample_value("affinity_ledger_unreported_total") == 0
            assert registry.get_sample_value("affinity_ledger_writes_total")


def events(raw: bytes) -> list[Any]:
    """The SSE events, without what differs between two answers (ids, times, backend)."""
    out: list[Any] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        if data == "[DONE]":
            out.append(data)
            continue
        doc = json.loads(data)
        for volatile in ("id", "created", "system_fingerprint"):
            doc.pop(volatile, None)
        if doc.get("usage"):
            doc["usage"] = sorted(doc["usage"])  # the counts depend on the cache's state
        out.append(doc)
    return out


@pytest.mark.parametrize("options", [None, {"include_usage": True}, {"include_usage": False}])
async def test_a_stream_is_what_vllm_would_send_the_client(dsn, options):
    async with cluster(dsn, nodes=1, backends=1, configure=fast_ledger) as c:
        secret = await c.new_key("t")
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 5,
            "stream": True,
        }
        if options is not None:
            body["stream_options"] = options
        auth = {"Authorization": f"Bearer {secret}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{c.nodes[0].url}/v1/chat/completions", json=body, headers=auth
            ) as r:
                assert r.status == 200
                through_node = await r.read()
            async with http.post(f"{c.backends[0].url}/v1/chat/completions", json=body) as r:
                direct = await r.read()
        assert events(through_node) == events(direct)
        has_usage = any(isinstance(e, dict) and e.get("usage") for e in events(direct))
        assert has_usage == (options == {"include_usage": True})

        async def ledgered() -> bool:
            return bool(await ledger_by_key(dsn))

        await wait_for(ledgered, what="the request in the ledger")
        (row,) = (await ledger_by_key(dsn)).values()
        assert row["requests"] == 1 and row["prompt_tokens"] > 0  # asked for, in every case


@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_a_database_outage_fails_no_request_and_loses_no_count(dsn, fault):
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with cluster(
            dsn, nodes=2, backends=2, node_dsn=proxy.dsn, configure=fast_ledger
        ) as c:
            secret = await c.new_key("t")
            seen = Seen()
            clients = [c.client(i, secret) for i in range(2)]
            for turn in range(4):  # the binding exists on both nodes: requests are hits
                await ask(clients[turn % 2], seen, ("chat", "stream")[turn % 2], turn)

            async def flushed() -> bool:
                led = await ledger_by_key(dsn)
                return sum(r["requests"] for r in led.values()) == seen.requests

            await wait_for(flushed, what="the first requests in the ledger")
            await proxy.stop() if fault == "stop" else proxy.freeze()

            def flush_failed() -> bool:
                return all(
                    (
                        n.app[METRICS_REGISTRY].get_sample_value(
                            "affinity_db_errors_total", {"operation": "ledger"}
                        )
                        or 0
                    )
                    >= 1
                    for n in c.nodes
                )

            hits = seen.headers["hit"]
            for turn in range(4, 16):
                await ask(clients[turn % 2], seen, ("chat", "stream")[turn % 2], turn)
            assert seen.headers["hit"] - hits == 12  # served from memory, database away
            await wait_for(flush_failed, timeout=10, what="a failed flush on every node")
            await proxy.start()  # a frozen relay now delivers what it held back
            await wait_for(flushed, timeout=15, what="the counts after the outage")
            (row,) = (await ledger_by_key(dsn)).values()
            assert (row["requests"], row["prompt_tokens"], row["cached_tokens"]) == (
                seen.requests,
                seen.prompt,
                seen.cached,
            )
        # after the nodes stopped (a last flush each): still exactly once
        (row,) = (await ledger_by_key(dsn)).values()
        assert (row["requests"], row["cached_tokens"]) == (seen.requests, seen.cached)
    finally:
        await proxy.close()
