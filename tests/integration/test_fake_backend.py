"""The vLLM simulator: OpenAI compatibility (through the official SDK), caching, timing, faults."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from affinity_node.sim.fake_backend import (
    STATS_KEY,
    FakeBackendConfig,
    FakeBackendStats,
    make_app,
    serve,
)
from affinity_node.sim.prefix_cache import BLOCK_SIZE, PrefixCache, block_hashes, tokenize
from affinity_node.sim.sampler import LoadSampler
from tests.support.waiting import wait_for

MODEL = "fake-model"


def words(n: int, tag: str = "w") -> str:
    """A prompt of exactly n tokens (no punctuation, one token per word)."""
    return " ".join(f"{tag}{i}" for i in range(n))


# --- prefix cache, directly -----------------------------------------------------------------


def test_tokenize_is_deterministic_and_splits_punctuation() -> None:
    assert tokenize("Hello, world!  foo_bar") == ["Hello", ",", "world", "!", "foo_bar"]
    assert tokenize(words(40)) == tokenize(words(40))


def test_only_full_blocks_are_hashed() -> None:
    assert block_hashes(tokenize(words(BLOCK_SIZE - 1))) == []
    assert len(block_hashes(tokenize(words(3 * BLOCK_SIZE + 5)))) == 3


def test_longest_cached_prefix_then_insert() -> None:
    cache = PrefixCache(capacity_blocks=100)
    first = tokenize(words(3 * BLOCK_SIZE + 5))
    assert cache.lookup_and_insert(first) == (0, len(first))
    assert cache.lookup_and_insert(first) == (3 * BLOCK_SIZE, len(first))
    # Shares two blocks, then diverges: the hit stops at the divergence.
    diverging = first[: 2 * BLOCK_SIZE] + tokenize(words(BLOCK_SIZE, "x"))
    assert cache.lookup_and_insert(diverging) == (2 * BLOCK_SIZE, 3 * BLOCK_SIZE)
    assert len(cache) == 4


def test_chained_hashes_same_block_after_other_prefix_does_not_hit() -> None:
    cache = PrefixCache(capacity_blocks=100)
    a, b, c = (tokenize(words(BLOCK_SIZE, tag)) for tag in "abc")
    cache.lookup_and_insert(a + b)
    # b is cached, but after a; after c it is another block.
    assert cache.lookup_and_insert(c + b) == (0, 2 * BLOCK_SIZE)
    assert cache.lookup_and_insert(b) == (0, BLOCK_SIZE)
    assert block_hashes(a + b)[1] != block_hashes(c + b)[1]


def test_namespaces_do_not_share_blocks() -> None:
    cache = PrefixCache(capacity_blocks=100)
    tokens = tokenize(words(BLOCK_SIZE))
    cache.lookup_and_insert(tokens, namespace="m1")
    assert cache.lookup_and_insert(tokens, namespace="m2") == (0, BLOCK_SIZE)
    assert cache.lookup_and_insert(tokens, namespace="m1") == (BLOCK_SIZE, BLOCK_SIZE)


def test_lru_evicts_least_recently_used_and_hits_refresh() -> None:
    cache = PrefixCache(capacity_blocks=2)
    a, b, c = (tokenize(words(BLOCK_SIZE, tag)) for tag in "abc")
    cache.lookup_and_insert(a)
    cache.lookup_and_insert(b)
    assert cache.lookup_and_insert(a)[0] == BLOCK_SIZE  # refreshes a
    cache.lookup_and_insert(c)  # evicts b, the least recently used
    assert len(cache) == 2
    assert cache.lookup_and_insert(a)[0] == BLOCK_SIZE
    assert cache.lookup_and_insert(b)[0] == 0


def test_a_prompt_longer_than_the_cache_keeps_its_head() -> None:
    cache = PrefixCache(capacity_blocks=2)
    tokens = tokenize(words(4 * BLOCK_SIZE))
    cache.lookup_and_insert(tokens)
    assert cache.lookup_and_insert(tokens)[0] == 2 * BLOCK_SIZE


def test_zero_capacity_caches_nothing() -> None:
    cache = PrefixCache(capacity_blocks=0)
    tokens = tokenize(words(2 * BLOCK_SIZE))
    cache.lookup_and_insert(tokens)
    assert cache.lookup_and_insert(tokens) == (0, 2 * BLOCK_SIZE)


# --- the HTTP backend -----------------------------------------------------------------------


@dataclass
class Running:
    port: int
    stats: FakeBackendStats
    client: openai.AsyncOpenAI
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (summed over series matching `labels`)."""
        async with self.http.get(f"{self.url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        total, found = 0.0, False
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
                    found = True
        assert found, f"no sample {name} {labels} in /metrics"
        return total

    async def set_failure(self, body: dict[str, Any]) -> None:
        async with self.http.post(f"{self.url}/admin/fail", json=body) as response:
            assert response.status == 200, await response.text()


@asynccontextmanager
async def running(handler_cancellation: bool = True, **overrides: Any) -> AsyncIterator[Running]:
    cfg = FakeBackendConfig(backend_id="b1", models=[MODEL], **overrides)
    app = make_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=10.0
    )
    try:
        async with aiohttp.ClientSession() as http:
            yield Running(port, app[STATS_KEY], client, http)
    finally:
        await client.close()
        await runner.cleanup()


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if the server logged an error (e.g. a traceback on disconnect)."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


async def test_models_list() -> None:
    async with running() as b:
        models = await b.client.models.list()
        assert [m.id for m in models.data] == [MODEL]


async def test_chat_non_stream() -> None:
    async with running() as b:
        raw = await b.client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            ],
            extra_headers={"x-request-id": "req-42"},
        )
        assert raw.headers["x-backend-id"] == "b1"
        assert raw.headers["x-request-id"] == "req-42"
        completion = raw.parse()
        assert completion.object == "chat.completion"
        assert completion.system_fingerprint == "b1"
        assert completion.model == MODEL
        message = completion.choices[0].message
        assert message.role == "assistant"
        assert message.content
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 16
        # "system", ":", "be", "brief", "user", ":", "hello", "there"
        assert completion.usage.prompt_tokens == 8
        assert b.stats.requests == 1
        assert b.stats.completed == 1

        again = await b.client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ],
        )
        assert again.choices[0].message.content == message.content  # deterministic


async def test_chat_stream_matches_non_stream() -> None:
    async with running() as b:
        messages: Any = [{"role": "user", "content": "tell me about caches"}]
        whole = await b.client.chat.completions.create(model=MODEL, messages=messages)
        raw = await b.client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert raw.headers["x-backend-id"] == "b1"
        assert raw.headers["content-type"].startswith("text/event-stream")
        stream = raw.parse()
        pieces, usage, finish = [], None, None
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            assert chunk.system_fingerprint == "b1"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == whole.choices[0].message.content
        assert finish == "stop"
        assert usage is not None
        assert usage.completion_tokens == 16


async def test_completions_stream_and_non_stream() -> None:
    async with running() as b:
        raw = await b.client.completions.with_raw_response.create(
            model=MODEL, prompt="once upon a time", max_tokens=5
        )
        assert raw.headers["x-backend-id"] == "b1"
        completion = raw.parse()
        assert completion.object == "text_completion"
        assert completion.system_fingerprint == "b1"
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 4
        assert completion.usage.completion_tokens == 5
        assert len(completion.choices[0].text.split()) == 5

        stream = await b.client.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=5, stream=True
        )
        texts: list[str] = []
        async for chunk in stream:
            assert chunk.system_fingerprint == "b1"
            texts.extend(choice.text for choice in chunk.choices)
        assert "".join(texts) == completion.choices[0].text


async def test_sim_pad_bytes_makes_a_large_non_streamed_answer_and_is_checked() -> None:
    """The knob behind the chaos soak's large answers: the text grows by exactly the padding,
    the usage does not; a bad value is a 400 with an OpenAI body."""
    async with running() as b:
        messages: Any = [{"role": "user", "content": "pad me"}]
        plain = await b.client.chat.completions.create(model=MODEL, messages=messages)
        big = await b.client.chat.completions.create(
            model=MODEL, messages=messages, extra_body={"sim_pad_bytes": 300_000}
        )
        text = big.choices[0].message.content or ""
        assert len(text) == len(plain.choices[0].message.content or "") + 300_000
        assert big.usage is not None and plain.usage is not None
        assert big.usage.completion_tokens == plain.usage.completion_tokens
        completion = await b.client.completions.create(
            model=MODEL, prompt="pad", max_tokens=3, extra_body={"sim_pad_bytes": 1000}
        )
        assert len(completion.choices[0].text) > 1000
        for bad in (-1, "10", True, 2**40):
            with pytest.raises(openai.BadRequestError) as refused:
                await b.client.chat.completions.create(
                    model=MODEL, messages=messages, extra_body={"sim_pad_bytes": bad}
                )
            assert isinstance(refused.value.body, dict)
            assert refused.value.body["param"] == "sim_pad_bytes"


async def test_errors_are_openai_shaped() -> None:
    async with running() as b:
        with pytest.raises(openai.NotFoundError) as not_found:
            await b.client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        assert not_found.value.status_code == 404
        assert isinstance(not_found.value.body, dict)
        assert set(not_found.value.body) == {"message", "type", "param", "code"}

        async with b.http.post(
            f"{b.url}/v1/chat/completions",
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert response.headers["x-backend-id"] == "b1"
            body = await response.json()
            assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_repeated_prefix_counts_cache_hits_in_metrics() -> None:
    async with running() as b:
        labels = {"model_name": MODEL}
        assert await b.metric("vllm:prefix_cache_hits_total", **labels) == 0
        prompt = words(10 * BLOCK_SIZE)
        first = await b.client.completions.create(model=MODEL, prompt=prompt)
        second = await b.client.completions.create(model=MODEL, prompt=prompt + " and more")
        assert first.usage is not None
        assert second.usage is not None
        total = first.usage.prompt_tokens + second.usage.prompt_tokens
        assert await b.metric("vllm:prefix_cache_queries_total", **labels) == total
        assert await b.metric("vllm:prefix_cache_hits_total", **labels) == 10 * BLOCK_SIZE
        details = second.usage.prompt_tokens_details
        assert details is not None
        assert details.cached_tokens == 10 * BLOCK_SIZE
        assert await b.metric("vllm:time_to_first_token_seconds_count", **labels) == 2
        assert await b.metric("vllm:num_requests_running", **labels) == 0
        assert await b.metric("vllm:num_requests_waiting", **labels) == 0


async def test_lru_eviction_under_capacity_pressure() -> None:
    async with running(cache_blocks=8) as b:
        first = words(4 * BLOCK_SIZE, "first")
        await b.client.completions.create(model=MODEL, prompt=first)
        warm = await b.client.completions.create(model=MODEL, prompt=first)
        assert warm.usage is not None
        assert warm.usage.prompt_tokens_details is not None
        assert warm.usage.prompt_tokens_details.cached_tokens == 4 * BLOCK_SIZE
        for i in range(4):
            await b.client.completions.create(model=MODEL, prompt=words(4 * BLOCK_SIZE, f"p{i}-"))
        hits_before = await b.metric("vllm:prefix_cache_hits_total")
        cold = await b.client.completions.create(model=MODEL, prompt=first)
        assert cold.usage is not None
        assert cold.usage.prompt_tokens_details is not None
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert await b.metric("vllm:prefix_cache_hits_total") == hits_before


async def first_chunk_seconds(b: Running, prompt: str) -> float:
    start = time.monotonic()
    stream = await b.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True
    )
    elapsed = None
    async for _chunk in stream:
        if elapsed is None:
            elapsed = time.monotonic() - start
    assert elapsed is not None
    return elapsed


async def test_ttft_falls_with_cached_tokens() -> None:
    async with running(prefill_s_per_token=0.0002) as b:
        prompt = words(2000)
        cold = await first_chunk_seconds(b, prompt)
        warm = await first_chunk_seconds(b, prompt)
        assert cold >= 2000 * 0.0002
        assert warm < cold * 0.5, (cold, warm)


async def test_fail_status_from_config_and_health() -> None:
    async with running(fail_status=503) as b:
        with pytest.raises(openai.APIStatusError) as failed:
            await b.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
        assert failed.value.status_code == 503
        assert failed.value.response.headers["x-backend-id"] == "b1"
        async with b.http.get(f"{b.url}/health") as response:
            assert response.status == 503
        assert b.stats.injected_failures == 1


async def test_failures_switch_at_runtime() -> None:
    async with running() as b:
        async with b.http.get(f"{b.url}/health") as response:
            assert response.status == 200
            assert await response.text() == "ok"
        await b.set_failure({"status": 429})
        with pytest.raises(openai.RateLimitError):
            await b.client.completions.create(model=MODEL, prompt="hi")
        await b.set_failure({})
        completion = await b.client.completions.create(model=MODEL, prompt="hi")
        assert completion.choices[0].text


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_drop_after_chunks_breaks_the_sdk_stream(
    handler_cancellation: bool, no_tracebacks: None
) -> None:
    async with running(handler_cancellation, drop_after_chunks=2) as b:
        stream = await b.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        received = 0
        with pytest.raises(openai.APIConnectionError):  # the body ends mid-chunk
            async for _chunk in stream:
                received += 1
        assert received == 2
        assert b.stats.dropped_streams == 1

        await b.set_failure({})
        stream = await b.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert len([chunk async for chunk in stream]) == 16 + 2


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_disconnect_mid_stream(
    handler_cancellation: bool, no_tracebacks: None
) -> None:
    async with running(handler_cancellation, tokens_per_s=50.0, output_tokens=200) as b:
        stream = await b.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
        assert b.stats.running == 1
        await stream.close()
        await wait_for(lambda: b.stats.disconnects == 1, timeout=5.0, what="a disconnect")
        await wait_for(lambda: b.stats.running == 0, timeout=5.0, what="the slot freed")
        assert await b.metric("vllm:num_requests_running", model_name=MODEL) == 0
        assert b.stats.completed == 0


async def test_client_disconnect_while_waiting_for_first_token(no_tracebacks: None) -> None:
    async with running(ttft_base_s=5.0) as b:
        timeout = aiohttp.ClientTimeout(total=0.2)
        body = {"model": MODEL, "prompt": "hi"}
        with pytest.raises(TimeoutError):
            await b.http.post(f"{b.url}/v1/completions", json=body, timeout=timeout)
        await wait_for(lambda: b.stats.disconnects == 1, timeout=5.0, what="a disconnect")
        assert b.stats.running == 0


async def test_bounded_concurrency_queues_requests() -> None:
    async with running(max_running=1, ttft_base_s=0.3) as b:
        first = b.client.completions.create(model=MODEL, prompt="one")
        second = b.client.completions.create(model=MODEL, prompt="two")
        tasks = [asyncio.create_task(first), asyncio.create_task(second)]
        await wait_for(lambda: b.stats.waiting == 1, timeout=5.0, what="a queued request")
        assert await b.metric("vllm:num_requests_waiting", model_name=MODEL) == 1
        assert await b.metric("vllm:num_requests_running", model_name=MODEL) == 1
        await asyncio.gather(*tasks)
        assert b.stats.waiting == 0
        assert b.stats.completed == 2


async def test_serve_helper_and_metrics_content_type() -> None:
    cfg = FakeBackendConfig(backend_id="b7", models=["m1", "m2"])
    async with await serve(cfg) as backend, aiohttp.ClientSession() as http:
        assert backend.port > 0
        async with http.get(f"{backend.url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            assert response.headers["x-backend-id"] == "b7"
            text = await response.text()
        assert 'vllm:prefix_cache_hits_total{model_name="m2"} 0.0' in text
        # vLLM's names for everything the capacity model exports, from the first scrape.
        for name in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:time_to_first_token_seconds_count",
            "vllm:request_queue_time_seconds_count",
            "vllm:e2e_request_latency_seconds_count",
        ):
            assert f'{name}{{model_name="m1"}} 0.0' in text, name
        async with http.get(f"{backend.base_url}/models") as response:
            ids = [m["id"] for m in json.loads(await response.text())["data"]]
        assert ids == ["m1", "m2"]


# --- the capacity model over HTTP -----------------------------------------------------------


async def test_requests_beyond_max_running_wait_fifo_and_show_in_metrics() -> None:
    async with running(max_running=1, ttft_base_s=0.3, output_tokens=2) as b:
        order: list[str] = []

        async def ask(name: str) -> None:
            await b.client.completions.create(model=MODEL, prompt=words(40, name))
            order.append(name)

        tasks = [asyncio.create_task(ask("one"))]
        await wait_for(lambda: b.stats.running == 1, timeout=5.0, what="the first admitted")
        for queued, name in enumerate(("two", "three"), 1):
            tasks.append(asyncio.create_task(ask(name)))
            await wait_for(
                lambda n=queued: b.stats.waiting == n, timeout=5.0, what=f"{queued} queued"
            )
        labels = {"model_name": MODEL}
        assert await b.metric("vllm:num_requests_waiting", **labels) == 2
        assert await b.metric("vllm:num_requests_running", **labels) == 1
        # 40 prompt tokens + 2 output tokens: 3 blocks of the default 2048.
        assert await b.metric("vllm:kv_cache_usage_perc", **labels) == pytest.approx(3 / 2048)
        await asyncio.gather(*tasks)
        assert order == ["one", "two", "three"]
        assert b.stats.max_waiting == 2 and b.stats.waiting == 0
        assert await b.metric("vllm:kv_cache_usage_perc", **labels) == 0
        assert await b.metric("vllm:request_queue_time_seconds_count", **labels) == 3
        # The third waited at least for the whole of the second (0.3 s to its first token),
        # the second for most of the first.
        assert await b.metric("vllm:request_queue_time_seconds_sum", **labels) > 0.5
        assert await b.metric("vllm:e2e_request_latency_seconds_count", **labels) == 3


async def test_concurrent_prefills_share_the_compute() -> None:
    # 300 uncached tokens at 1 ms each: 0.3 s alone; two at once take twice as long each.
    async with running(prefill_s_per_token=0.001, ttft_base_s=0.0, output_tokens=1) as b:
        alone = await first_chunk_seconds(b, words(300, "solo"))
        assert alone >= 0.3
        both = await asyncio.gather(
            first_chunk_seconds(b, words(300, "left")), first_chunk_seconds(b, words(300, "right"))
        )
        assert min(both) >= 0.6 - 0.02, both  # a few ms of slack for the event loop's clock


async def test_kv_blocks_hold_requests_back() -> None:
    # 100 tokens + 16 out = 8 blocks each; a pool of 10 blocks runs one at a time.
    async with running(kv_cache_blocks=10, ttft_base_s=0.3, output_tokens=16) as b:
        tasks = [
            asyncio.create_task(b.client.completions.create(model=MODEL, prompt=words(100, t)))
            for t in ("a", "b")
        ]
        await wait_for(lambda: b.stats.waiting == 1, timeout=5.0, what="one held back")
        assert b.stats.running == 1
        assert await b.metric("vllm:kv_cache_usage_perc") == pytest.approx(0.8)
        await asyncio.gather(*tasks)


async def test_the_sampler_sees_a_queue_that_is_gone_by_the_end() -> None:
    async with running(max_running=1, ttft_base_s=0.3, output_tokens=1) as b:
        sampler = LoadSampler(b.http, {"b1": f"{b.url}/metrics", "gone": "http://127.0.0.1:9/m"})
        async with sampler:
            tasks = [
                asyncio.create_task(b.client.completions.create(model=MODEL, prompt=f"q{i}"))
                for i in range(3)
            ]
            await wait_for(
                lambda: sampler.peaks["b1"].waiting >= 2, timeout=5.0, what="the queue sampled"
            )
            await asyncio.gather(*tasks)
        assert b.stats.waiting == 0
        assert sampler.max_waiting == {"b1": 2.0, "gone": 0.0}  # an unreachable one is skipped
        assert sampler.peaks["b1"].running == 1.0
        sampler.reset()
        assert sampler.max_waiting == {"b1": 0.0, "gone": 0.0}
