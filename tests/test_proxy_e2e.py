"""End to end: the openai SDK against real nodes, real fake-vLLM backends, real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import openai

from tests.support.cluster import ALIAS, MODEL, cluster

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about prefix caching."}]


async def chat(client: openai.AsyncOpenAI, stream: bool, model: str = MODEL):
    """Returns (backend id, x-affinity, text) for one request."""
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=8)
        body = raw.parse()
        text = body.choices[0].message.content
        return raw.headers["x-backend-id"], raw.headers["x-affinity"], text
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=8, stream=True)
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
        results = await asyncio.gather(*(
            chat(clients[i % 3], stream=bool(i % 2), model=ALIAS if i % 5 == 0 else MODEL)
            for i in range(60)
        ))
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
