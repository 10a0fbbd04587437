"""The API beyond chat, end to end through 3 nodes: the official `openai` and `anthropic` SDKs
against real nodes, fake vLLM backends (which keep stored responses in memory, each its own,
as vLLM does) and a real Postgres."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest

from affinity_node.http.state import METRICS_REGISTRY
from tests.support.cluster import ALIAS, MODEL, Cluster, cluster
from tests.support.waiting import wait_for

INSTRUCTIONS = "You are a coding agent working in a large repository. " * 6


async def one_row(dsn: str) -> tuple[str, list[str]]:
    conn = await asyncpg.connect(dsn)
    try:
        r = await conn.fetchrow("SELECT provider_url, fanout_urls FROM api_key_model_affinity")
    finally:
        await conn.close()
    assert r is not None
    return r[0], list(r[1])


async def grow_to_all(c: Cluster, key: str) -> None:
    """The pair's binding grows into a set of every backend (as fan-out does under load)."""
    provider, _ = await one_row(c.dsn)
    others = [b.url for b in c.backends if b.url != provider]
    conn = await asyncpg.connect(c.dsn)
    try:
        await conn.execute("UPDATE api_key_model_affinity SET fanout_urls = $1", others)
    finally:
        await conn.close()
    for node in c.nodes:
        await wait_for(
            lambda node=node: (
                len(node.engine.cache.get((c.key_ids[key], MODEL)).fanout) == len(others)
            ),
            what="the set on every node",
        )


async def turn(
    client: openai.AsyncOpenAI, text: str, previous: str | None, stream: bool
) -> tuple[str, str, str]:
    """One Responses turn: (response id, backend that served, x-affinity)."""
    extra: dict[str, Any] = {}
    if previous is not None:
        extra["previous_response_id"] = previous
    if not stream:
        raw = await client.responses.with_raw_response.create(
            model=MODEL, instructions=INSTRUCTIONS, input=text, max_output_tokens=8, **extra
        )
        response = raw.parse()
        assert response.output_text
        return response.id, raw.headers["x-backend-id"], raw.headers["x-affinity"]
    raw_stream = await client.responses.with_raw_response.create(
        model=MODEL,
        instructions=INSTRUCTIONS,
        input=text,
        max_output_tokens=8,
        stream=True,
        **extra,
    )
    ids = set()
    completed = None
    async for event in raw_stream.parse():
        if event.type in ("response.created", "response.completed"):
            ids.add(event.response.id)
        if event.type == "response.completed":
            completed = event.response
    assert completed is not None and completed.usage is not None
    assert len(ids) == 1  # every event names the same (tagged) id
    return ids.pop(), raw_stream.headers["x-backend-id"], raw_stream.headers["x-affinity"]


async def test_responses_chains_stay_on_their_owner_through_every_node_in_a_set(dsn):
    async with cluster(dsn, nodes=3, backends=4) as c:
        secret = await c.new_key("agent")
        clients = [c.client(i, secret) for i in range(3)]
        await turn(clients[0], "warm up", None, stream=False)
        await grow_to_all(c, "agent")
        chains: dict[int, list[str]] = {}
        for chain in range(4):
            previous: str | None = None
            served: list[str] = []
            for i in range(5):
                rid, backend, affinity = await turn(
                    clients[(chain + i) % 3],
                    f"chain {chain} turn {i}: fix the failing test in module {chain}",
                    previous,
                    stream=bool(i % 2),
                )
                assert rid.startswith("resp_") and "." in rid  # tagged with its owner
                if previous is not None:
                    assert affinity == "hit"
                previous = rid
                served.append(backend)
            assert len(set(served)) == 1, served  # every turn where the chain is stored
            chains[chain] = served
            # Any node answers GET for it, from the owner.
            raw = await clients[(chain + 2) % 3].responses.with_raw_response.retrieve(previous)
            assert raw.parse().id == previous and raw.headers["x-backend-id"] == served[0]
        # A set spreads new chains over its members (their openings differ): 16 openings, so
        # that all on one member is a 4 x 4^-16 chance, not the 1 in 64 of the 4 chains alone.
        openings = [s[0] for s in chains.values()]
        for extra in range(12):
            _, backend, _ = await turn(
                clients[extra % 3], f"a new task {extra}: rename module {extra}", None, False
            )
            openings.append(backend)
        sets = [len(n.engine.cache.get((c.key_ids["agent"], MODEL)).fanout) for n in c.nodes]
        assert len(set(openings)) >= 2, (openings, "set sizes", sets)


async def test_a_stored_response_of_a_backend_that_left_is_a_clear_404_never_sent_elsewhere(dsn):
    async with cluster(dsn, nodes=2, backends=3) as c:
        secret = await c.new_key("agent")
        clients = [c.client(i, secret) for i in range(2)]
        rid, owner, _ = await turn(clients[0], "first", None, stream=False)
        dead = next(b for b in c.backends if b.backend.cfg.backend_id == owner)
        await dead.close()
        for node in c.nodes:
            await wait_for(
                lambda node=node: not node.backends.get(dead.url.rstrip("/")).healthy,
                what="the owner ejected",
            )
        before = [b.stats.requests for b in c.backends if b is not dead]
        for client in clients:
            with pytest.raises(openai.NotFoundError) as err:
                await client.responses.create(
                    model=MODEL, input="next", previous_response_id=rid, max_output_tokens=4
                )
            body = err.value.body
            assert isinstance(body, dict) and body.get("code") == "response_not_found"
            assert "no longer available" in str(body.get("message"))
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(rid)
        after = [b.stats.requests for b in c.backends if b is not dead]
        assert after == before  # nothing went to a backend that cannot have it


async def test_one_keys_response_ids_do_not_work_for_another_key(dsn):
    async with cluster(dsn, nodes=1, backends=2) as c:
        alice = c.client(0, await c.new_key("alice"))
        mallory = c.client(0, await c.new_key("mallory"))
        rid, _, _ = await turn(alice, "secret plans", None, stream=False)
        with pytest.raises(openai.NotFoundError):
            await mallory.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            await mallory.responses.create(
                model=MODEL, input="tell me", previous_response_id=rid, max_output_tokens=4
            )
        untagged = rid.rpartition(".")[0]
        with pytest.raises(openai.NotFoundError):  # a backend's own id is not ours to route
            await alice.responses.retrieve(untagged)


async def test_background_response_cancel_goes_to_its_owner(dsn):
    async with cluster(dsn, nodes=2, backends=3) as c:
        secret = await c.new_key("agent")
        a, b = c.client(0, secret), c.client(1, secret)
        started = await a.responses.create(
            model=MODEL, input="a long task", background=True, max_output_tokens=2000
        )
        cancelled = await b.responses.cancel(started.id)
        assert cancelled.id == started.id and cancelled.status == "cancelled"


def anthropic_client(c: Cluster, node: int, secret: str) -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(
        base_url=c.nodes[node].url, api_key=secret, max_retries=0, timeout=30.0
    )
    c.stack.push_async_callback(client.close)
    return client


async def test_messages_through_nodes_with_the_anthropic_sdk(dsn):
    async with cluster(dsn, nodes=3, backends=3) as c:
        secret = await c.new_key("claude-code")
        clients = [anthropic_client(c, i, secret) for i in range(3)]
        messages = [{"role": "user", "content": "Explain the failing build, briefly."}]
        served = set()
        for i, client in enumerate(clients):
            raw = await client.messages.with_raw_response.create(
                model=ALIAS if i == 1 else MODEL,
                max_tokens=8,
                system="You are Claude Code.",
                messages=messages,
            )
            message = await raw.parse()
            assert message.content and message.usage.output_tokens > 0
            served.add(raw.headers["x-backend-id"])
            assert raw.headers["x-affinity"] in ("miss", "hit")
        async with clients[1].messages.stream(
            model=MODEL, max_tokens=8, system="You are Claude Code.", messages=messages
        ) as stream:
            text = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(text) and final.usage.output_tokens > 0
        assert len(served) == 1  # one pair, one backend, whichever node
        # The second request onwards read its prompt from the backend's cache.
        assert message.usage.cache_read_input_tokens
        count = await clients[2].messages.count_tokens(model=MODEL, messages=messages)
        assert count.input_tokens > 0
        # Errors come in Anthropic's shape.
        with pytest.raises(anthropic.NotFoundError) as err:
            await clients[0].messages.create(model="no-such-model", max_tokens=4, messages=messages)
        assert err.value.body == {
            "type": "error",
            "error": {
                "type": "not_found_error",
                "message": "The model 'no-such-model' does not exist.",
            },
        }
        bad = anthropic_client(c, 0, "sk-not-a-key")
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await bad.messages.create(model=MODEL, max_tokens=4, messages=messages)
        assert isinstance(auth.value.body, dict) and auth.value.body["type"] == "error"


async def test_embeddings_audio_and_vllm_extras_through_a_node(dsn):
    async with cluster(dsn, nodes=2, backends=2) as c:
        secret = await c.new_key("rag")
        client = c.client(1, secret)
        raw = await client.embeddings.with_raw_response.create(
            model=ALIAS, input=["prefix caching", "sticky routing"]
        )
        embeddings = raw.parse()
        assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) > 8
        assert raw.headers["x-affinity"] == "bypass"
        audio = io.BytesIO(b"RIFF" + bytes(range(256)) * 40)
        audio.name = "meeting.wav"
        transcript = await client.audio.transcriptions.create(model=ALIAS, file=audio)
        assert transcript.text
        with pytest.raises(openai.BadRequestError):  # no model in the form
            await client.post(
                "/audio/transcriptions",
                cast_to=object,
                files=[("file", ("x.wav", b"RIFF0000", "audio/wav"))],
                options={"headers": {"Content-Type": "multipart/form-data"}},
            )
        headers = {"Authorization": f"Bearer {secret}"}
        async with aiohttp.ClientSession(headers=headers) as http:
            base = c.nodes[0].url
            async with http.post(f"{base}/tokenize", json={"model": MODEL, "prompt": "hi"}) as r:
                tokens = await r.json()
                assert r.status == 200 and tokens["count"] == len(tokens["tokens"])
            async with http.post(
                f"{base}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}
            ) as r:
                assert r.status == 200 and "prompt" in await r.json()
            for path in ("/v1/rerank", "/v1/score"):
                body: dict[str, Any] = {"model": MODEL, "query": "cache", "documents": ["a", "b"]}
                if path == "/v1/score":
                    body = {"model": MODEL, "text_1": "cache", "text_2": ["a cache", "b"]}
                async with http.post(f"{base}{path}", json=body) as r:
                    assert r.status == 200, await r.text()
            async with http.post(f"{base}/v1/embeddings", data=b"{not json") as r:
                assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        registry = c.nodes[1].app[METRICS_REGISTRY]
        assert registry.get_sample_value(
            "affinity_http_requests_total", {"route": "/v1/embeddings", "code": "200"}
        )
        assert registry.get_sample_value(
            "affinity_http_requests_total", {"route": "/v1/audio/transcriptions", "code": "200"}
        )


async def test_the_ledger_counts_responses_and_messages_usage(dsn):
    def fast(cfg: Any) -> None:
        cfg.ledger.flush_interval_seconds = 0.1

    async with cluster(dsn, nodes=2, backends=2, configure=fast) as c:
        secret = await c.new_key("agent")
        client = c.client(0, secret)
        rid, _, _ = await turn(client, "one", None, stream=False)
        _, _, _ = await turn(c.client(1, secret), "two", rid, stream=True)
        claude = anthropic_client(c, 1, secret)
        msgs = [{"role": "user", "content": "hello"}]
        await claude.messages.create(model=MODEL, max_tokens=4, messages=msgs)
        async with claude.messages.stream(model=MODEL, max_tokens=4, messages=msgs) as s:
            await s.get_final_message()

        found: list[tuple[int, int, int, int]] = []

        async def totals() -> bool:
            conn = await asyncpg.connect(dsn)
            try:
                r = await conn.fetchrow(
                    "SELECT sum(requests), sum(prompt_tokens), sum(cached_tokens),"
                    " sum(completion_tokens) FROM usage_ledger"
                )
            finally:
                await conn.close()
            if r is None or r[0] != 4:
                return False
            found.append((int(r[0]), int(r[1]), int(r[2]), int(r[3])))
            return True

        await wait_for(totals, what="four answers in the ledger")
        _, prompt, cached, completion = found[-1]
        assert prompt > 0 and completion > 0 and 0 < cached <= prompt


async def test_x_api_key_is_accepted_on_openai_routes_too(dsn):
    async with cluster(dsn, nodes=1, backends=1) as c:
        secret = await c.new_key("k")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{c.nodes[0].url}/v1/chat/completions",
                headers={"x-api-key": secret},
                data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            ) as r:
                assert r.status == 200
            async with http.post(
                f"{c.nodes[0].url}/v1/messages",
                headers={"x-api-key": "sk-wrong"},
                json={"model": MODEL, "max_tokens": 2, "messages": []},
            ) as r:
                assert r.status == 401
                assert (await r.json())["error"]["type"] == "authentication_error"
            await asyncio.sleep(0)
