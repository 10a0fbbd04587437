"""Real engines end to end: llama.cpp servers (the tiny random-weight model, one child
process and one thread each, `kind: llamacpp`) behind three proxy nodes sharing Postgres,
driven with the official openai SDK. Every cached-token count here is the engine's own report,
and the load the nodes poll is the engine's own /metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from affinity_node.sim.llamacpp import make_tiny_model, start_server
from affinity_node.sim.support import Processes, free_port
from tests.integration.test_ledger_e2e import ledger_by_key
from tests.support.llamacpp import MODEL, LlamaFleet, llama_fleet
from tests.support.waiting import wait_for

pytest.importorskip("xllamacpp", reason="the dev extra installs llama.cpp's server wheel")

WORDS = ("cache", "prefix", "tenant", "engine", "token", "slot", "prompt", "route", "node")


def instructions(seed: int, words: int = 400) -> str:
    """A long system prompt (~2,000 tokens of the tiny model): long enough that prefilling it
    costs the engine hundreds of milliseconds, so its cache matters."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


SYSTEM = instructions(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@dataclass
class Turn:
    """What a client saw of one answer."""

    affinity: str
    text: str
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    reported: bool = False


class Conversation:
    """One tenant's chat: every turn resends the whole history, as chat clients do."""

    def __init__(self, system: str = SYSTEM) -> None:
        self.messages: list[Any] = [{"role": "system", "content": system}]
        self.turns: list[Turn] = []

    async def say(
        self, client: openai.AsyncOpenAI, text: str, how: str = "plain", max_tokens: int = 6
    ) -> Turn:
        """`how`: plain (not streamed), stream (usage asked) or silent (streamed, not asked)."""
        self.messages.append({"role": "user", "content": text})
        if how == "plain":
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=self.messages, max_tokens=max_tokens
            )
            answer = raw.parse()
            turn = Turn(raw.headers["x-affinity"], answer.choices[0].message.content or "")
            usage = answer.usage
        else:
            options = {"include_usage": True} if how == "stream" else None
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=self.messages,
                max_tokens=max_tokens,
                stream=True,
                stream_options=options,  # type: ignore[arg-type]
            )
            chunks = [chunk async for chunk in raw.parse()]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            turn = Turn(raw.headers["x-affinity"], text)
            usages = [c.usage for c in chunks if c.usage is not None]
            if how == "silent":
                assert usages == [], "usage the client never asked for"
                usage = None
            else:  # the engine's own final usage event: exactly one, last, no choices
                assert len(usages) == 1 and chunks[-1].usage is not None
                assert chunks[-1].choices == []
                usage = usages[0]
        if usage is not None:
            turn.prompt, turn.completion = usage.prompt_tokens, usage.completion_tokens
            details = usage.prompt_tokens_details
            turn.cached = details.cached_tokens or 0 if details is not None else 0
            turn.reported = True
        self.messages.append({"role": "assistant", "content": turn.text})
        self.turns.append(turn)
        return turn


async def wait_ledgered(fleet: LlamaFleet, requests: int) -> dict[Any, dict[str, int]]:
    async def flushed() -> bool:
        led = await ledger_by_key(fleet.dsn)
        return sum(r["requests"] for r in led.values()) == requests

    await wait_for(flushed, timeout=10, what=f"{requests} requests in the ledger")
    return await ledger_by_key(fleet.dsn)


@pytest.mark.timeout(90)
async def test_a_returning_tenant_is_prefilled_from_its_engines_cache(dsn, tiny_model):
    async with llama_fleet(dsn, tiny_model, engines=3, nodes=3) as fleet:
        alice, bob = await fleet.new_key("alice"), await fleet.new_key("bob")
        a = [fleet.client(i, alice) for i in range(3)]
        b = [fleet.client(i, bob) for i in range(3)]
        ours, theirs = Conversation(), Conversation()

        first = await ours.say(a[0], "What is a prefix cache?")
        assert first.affinity == "miss" and first.prompt > 1500
        assert first.cached == 0  # a fresh engine has seen nothing
        # Bob asks exactly the same on the same node: round robin puts him on another engine,
        # which has never seen this prompt: nothing cached there, all of it computed.
        other = await theirs.say(b[0], "What is a prefix cache?", how="silent")
        assert other.affinity == "miss"
        alice_at, bob_at = await fleet.bound_to("alice"), await fleet.bound_to("bob")
        assert alice_at is not None and bob_at is not None and alice_at != bob_at
        computed, found = await fleet.engine_counts(fleet.engine_at(bob_at))
        assert found == 0 and computed >= first.prompt

        # Alice's next turns arrive on the other nodes: each is a hit on her engine, which
        # prefills only what is new (its own count: cached_tokens).
        second = await ours.say(a[1], "And how long does it live?", how="stream")
        third = await ours.say(a[2], "Who shares it?")
        for turn, before in ((second, first), (third, second)):
            assert turn.affinity == "hit"
            assert turn.cached >= before.prompt - 8, (turn, before)
            assert turn.prompt - turn.cached < turn.prompt / 10  # only the new messages
        assert await fleet.bound_to("alice") == alice_at
        # Bob's second turn (streamed, usage not asked: the node asks and strips it).
        await theirs.say(b[2], "And how long does it live?", how="silent")

        # The ledger holds what the engines reported: the turns Alice saw, token for token,
        # and over all tenants exactly what the engines' own /metrics counted.
        led = await wait_ledgered(fleet, requests=5)
        row = led[fleet.key_ids["alice"]]
        assert row["requests"] == 3
        assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (
            sum(t.prompt for t in ours.turns),
            sum(t.cached for t in ours.turns),
            sum(t.completion for t in ours.turns),
        )
        # Bob's second turn was found in his engine's cache although he never saw a count.
        assert led[fleet.key_ids["bob"]]["cached_tokens"] >= first.prompt - 8 > 0
        counts = [await fleet.engine_counts(e) for e in fleet.engines]
        assert sum(r["cached_tokens"] for r in led.values()) == sum(f for _, f in counts)
        assert sum(r["prompt_tokens"] for r in led.values()) == sum(c + f for c, f in counts)

        # A prompt over the engine's context: its own 400, passed on as an OpenAI error.
        with pytest.raises(openai.BadRequestError) as err:
            await a[0].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "abc " * 5000}], max_tokens=1
            )
        assert err.value.status_code == 400


def connections_to(port: int) -> list[str]:
    """The states of this process's TCP connections to `port` (the nodes run in it)."""
    return [
        c.status
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


@pytest.mark.timeout(60)
async def test_a_pooled_connection_outlives_the_engines_idle_close(dsn, tiny_model):
    # Nothing but the test's requests talks to the engine: its connection really sits idle.
    async with llama_fleet(dsn, tiny_model, engines=2, nodes=1, quiet=True) as fleet:
        client = fleet.client(0, await fleet.new_key("alice"))
        chat = Conversation(instructions(2, words=100))
        await chat.say(client, "Hello?")
        engine = fleet.engine_at(await fleet.bound_to("alice") or "")
        assert "ESTABLISHED" in connections_to(engine.port)  # kept for the next request
        computed, _ = await fleet.engine_counts(engine)
        # llama.cpp (cpp-httplib) closes a connection idle for 5 s, as vLLM's uvicorn does.
        await wait_for(
            lambda: "ESTABLISHED" not in connections_to(engine.port),
            timeout=15,
            interval=0.1,
            what="the engine to close the idle connection",
        )
        for how in ("plain", "stream"):
            turn = await chat.say(client, "Still there?", how=how)
            assert turn.affinity == "hit" and turn.cached > 0
        assert (await fleet.engine_counts(engine))[0] > computed  # it served both
        assert await fleet.bound_to("alice") == engine.url


@pytest.mark.timeout(60)
async def test_a_killed_engine_fails_over_and_the_tenant_rebuilds_its_cache(dsn, tiny_model):
    async with llama_fleet(dsn, tiny_model, engines=3, nodes=3) as fleet:
        alice = await fleet.new_key("alice")
        a = [fleet.client(i, alice) for i in range(3)]
        chat = Conversation()
        await chat.say(a[0], "What is a prefix cache?")
        dead = fleet.engine_at(await fleet.bound_to("alice") or "")
        fleet.kill(dead)
        await asyncio.wait_for(dead.child.proc.wait(), 10)

        # Her next request fails on the dead engine and is retried, before any byte reached
        # her, on her pair's successor (the same engine on every node).
        retried = await chat.say(a[1], "Are you there?", how="stream")
        assert retried.affinity in ("spill", "rebind")
        assert retried.cached < 64  # that engine had never seen her

        async def all_nodes_eject() -> bool:
            pools = [node.backends.get(dead.url) for node in fleet.nodes]
            return all(b is not None and not b.healthy for b in pools)

        await wait_for(all_nodes_eject, timeout=10, what="every node to eject the dead engine")
        # Once it is ejected the binding moves there, and the retry had warmed that cache.
        moved = await chat.say(a[2], "Good. Again?")
        assert moved.affinity in ("rebind", "hit") and moved.cached >= retried.prompt - 8
        survivor = await fleet.bound_to("alice")
        assert survivor not in (None, dead.url)
        back = await chat.say(a[0], "Once more?")
        assert back.affinity == "hit" and back.cached >= moved.prompt - 8
        assert await fleet.bound_to("alice") == survivor


@pytest.mark.timeout(60)
async def test_the_load_poller_reads_the_engine_s_busy_slots_and_queue(dsn, tiny_model):
    # One engine, one slot: of three long generations one runs and two wait in its queue.
    async with llama_fleet(dsn, tiny_model, engines=1, nodes=1) as fleet:
        client = fleet.client(0, await fleet.new_key("alice"))
        engine = fleet.nodes[0].backends.get(fleet.engines[0].url)
        assert engine is not None and engine.kind == "llamacpp"
        await wait_for(lambda: engine.running == 0.0, timeout=10, what="a poll of the idle engine")
        assert engine.waiting == 0.0

        async def generate(i: int) -> None:
            await client.completions.create(
                model=MODEL,
                prompt=f"Tell me a long story, number {i}.",
                max_tokens=3000,
                extra_body={"ignore_eos": True},  # the random model may end early otherwise
            )

        calls = [asyncio.create_task(generate(i)) for i in range(3)]
        try:
            # Read from the engine's llamacpp:requests_processing / _deferred, not the node's
            # own in-flight count (which would say 3 running).
            await wait_for(
                lambda: engine.running == 1.0 and engine.waiting == 2.0,
                timeout=10,
                interval=0.05,
                what="a poll that sees one request running and two deferred",
            )
            assert engine.inflight == 3
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.timeout(60)
async def test_an_engine_started_with_a_backend_id_names_itself_in_every_answer(
    tiny_model, tmp_path
):
    """The demo's engines (llama.cpp sends no x-backend-id): the relay in the engine's process
    adds it and passes the answer through unchanged, streams chunk by chunk included."""
    processes = Processes(tmp_path)
    try:
        async with aiohttp.ClientSession() as http:
            engine = await start_server(
                processes, http, "engine", tiny_model, free_port(), backend_id="b7"
            )
            client = openai.AsyncOpenAI(
                base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=30.0
            )
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
                )
                assert raw.headers["x-backend-id"] == "b7"
                assert raw.parse().usage is not None
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=3,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                assert raw.headers["x-backend-id"] == "b7"
                chunks = [chunk async for chunk in raw.parse()]
                assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
            finally:
                await client.close()
            async with http.get(f"{engine.url}/metrics") as resp:
                assert resp.headers["x-backend-id"] == "b7"
                assert "llamacpp:requests_processing" in await resp.text()
    finally:
        await processes.close()
