"""The simulator's wider API through real clients: the `openai` SDK (responses, embeddings,
audio), the `anthropic` SDK (messages), plain HTTP for vLLM's own routes; LoRA adapters."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from affinity_node.sim.fake_backend import FakeBackendConfig, RunningFakeBackend, serve
from affinity_node.sim.prefix_cache import BLOCK_SIZE
from tests.support.waiting import wait_for

MODEL = "fake-model"
INSTRUCTIONS = " ".join(f"rule{i}" for i in range(6 * BLOCK_SIZE))
"""Long enough that a chain's first prompt fills several prefix-cache blocks."""
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "search",
        "description": "search the docs",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]


@dataclass
class Sim:
    backend: RunningFakeBackend
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    http: aiohttp.ClientSession

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.backend.url + path, json=body) as response:
            assert response.headers["x-backend-id"] == self.backend.backend.cfg.backend_id
            text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


@asynccontextmanager
async def sim(backend_id: str = "b1", **overrides: Any) -> AsyncIterator[Sim]:
    cfg = FakeBackendConfig(backend_id=backend_id, models=[MODEL], **overrides)
    async with await serve(cfg) as backend, aiohttp.ClientSession() as http:
        oa = openai.AsyncOpenAI(base_url=backend.base_url, api_key="k", max_retries=0, timeout=10)
        an = anthropic.AsyncAnthropic(base_url=backend.url, api_key="k", max_retries=0, timeout=10)
        try:
            yield Sim(backend, oa, an, http)
        finally:
            await oa.close()
            await an.close()


# --- Responses ------------------------------------------------------------------------------


async def test_responses_non_stream_and_get() -> None:
    async with sim() as s:
        raw = await s.openai.responses.with_raw_response.create(
            model=MODEL, input="hello there", instructions="be brief", prompt_cache_key="conv-1"
        )
        assert raw.headers["x-backend-id"] == "b1"
        response = raw.parse()
        assert response.id.startswith("resp_")
        assert response.status == "completed"
        assert response.output_text
        assert len(response.output_text.split()) == 16
        assert response.usage is not None
        # "system", ":", "be", "brief", "user", ":", "hello", "there"
        assert response.usage.input_tokens == 8
        assert response.usage.output_tokens == 16
        assert response.usage.total_tokens == 24
        assert response.usage.input_tokens_details.cached_tokens == 0

        again = await s.openai.responses.retrieve(response.id)
        assert again.id == response.id and again.output_text == response.output_text
        with pytest.raises(openai.NotFoundError) as unknown:
            await s.openai.responses.retrieve("resp_doesnotexist")
        assert isinstance(unknown.value.body, dict)
        assert unknown.value.body["code"] == "response_not_found"


async def test_responses_stream_named_events_and_usage_in_the_final_one() -> None:
    async with sim() as s:
        whole = await s.openai.responses.create(model=MODEL, input="stream me please")
        stream = await s.openai.responses.create(model=MODEL, input="stream me please", stream=True)
        types: list[str] = []
        deltas: list[str] = []
        final = None
        async for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.completed":
                final = event.response
        assert types[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert types[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert "".join(deltas) == whole.output_text  # same prompt, same deterministic text
        assert final is not None and final.usage is not None
        assert final.usage.output_tokens == 16
        # The second request saw nothing cacheable (prompt shorter than a block).
        assert final.usage.input_tokens_details.cached_tokens == 0
        # A streamed response is stored as well.
        assert (await s.openai.responses.retrieve(final.id)).output_text == whole.output_text


async def test_a_chain_grows_its_cached_prefix_and_lives_on_one_server() -> None:
    async with sim("b1") as first, sim("b2") as second:
        turns = []
        previous = None
        for question in ("first question", "second question", "third question"):
            response = await first.openai.responses.create(
                model=MODEL,
                instructions=INSTRUCTIONS,
                input=question,
                previous_response_id=previous,
            )
            turns.append(response)
            previous = response.id
        inputs = [t.usage.input_tokens for t in turns if t.usage is not None]
        cached = [t.usage.input_tokens_details.cached_tokens for t in turns if t.usage is not None]
        assert len(inputs) == 3
        # Each turn's prompt is the whole conversation so far: it grows by the previous
        # answer and the new question, and all but its tail is in the prefix cache.
        assert inputs[0] < inputs[1] < inputs[2]
        assert cached[0] == 0
        assert 0 < cached[1] < cached[2]
        assert cached[1] == inputs[0] // BLOCK_SIZE * BLOCK_SIZE
        assert cached[2] == inputs[1] // BLOCK_SIZE * BLOCK_SIZE

        with pytest.raises(openai.NotFoundError) as elsewhere:
            await second.openai.responses.create(
                model=MODEL, input="fourth question", previous_response_id=previous
            )
        assert elsewhere.value.response.headers["x-backend-id"] == "b2"
        assert elsewhere.value.body == {
            "message": f"Response with id '{previous}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "response_not_found",
        }


async def test_store_false_keeps_nothing_and_the_store_is_bounded() -> None:
    async with sim(response_store_size=2) as s:
        unstored = await s.openai.responses.create(model=MODEL, input="x", store=False)
        with pytest.raises(openai.NotFoundError):
            await s.openai.responses.retrieve(unstored.id)
        ids = [(await s.openai.responses.create(model=MODEL, input=f"q{i}")).id for i in range(3)]
        with pytest.raises(openai.NotFoundError):  # the least recently used went out
            await s.openai.responses.retrieve(ids[0])
        assert (await s.openai.responses.retrieve(ids[2])).id == ids[2]


async def test_a_tool_call_turn_then_its_output() -> None:
    async with sim() as s:
        call = await s.openai.responses.create(
            model=MODEL, input="please call tool search", tools=TOOLS
        )
        item = call.output[0]
        assert item.type == "function_call"
        assert item.name == "search"
        assert item.call_id.startswith("call_")
        assert isinstance(json.loads(item.arguments)["query"], str)
        answer = await s.openai.responses.create(
            model=MODEL,
            previous_response_id=call.id,
            tools=TOOLS,
            input=[{"type": "function_call_output", "call_id": item.call_id, "output": "42"}],
        )
        assert answer.output[0].type == "message"
        assert answer.output_text
        # Without tools the same words are just a question.
        plain = await s.openai.responses.create(model=MODEL, input="please call tool search")
        assert plain.output[0].type == "message"

        stream = await s.openai.responses.create(
            model=MODEL, input="call tool now", tools=TOOLS, stream=True
        )
        pieces, done = [], None
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
            if event.type == "response.function_call_arguments.done":
                done = event.arguments
        assert done is not None and "".join(pieces) == done
        assert set(json.loads(done)) == {"query"}


async def test_background_response_can_be_cancelled() -> None:
    async with sim(ttft_base_s=30.0) as s:
        queued = await s.openai.responses.create(model=MODEL, input="slow", background=True)
        assert queued.status == "queued"
        await wait_for(lambda: s.backend.stats.running == 1, timeout=5, what="admitted")
        cancelled = await s.openai.responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        assert (await s.openai.responses.retrieve(queued.id)).status == "cancelled"
        await wait_for(lambda: s.backend.stats.running == 0, timeout=5, what="slot freed")
        status, body = await s.post(f"/v1/responses/{queued.id}/cancel", {})
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        status, body = await s.post("/v1/responses/resp_nope/cancel", {})
        assert status == 404 and body["error"]["code"] == "response_not_found"


async def test_background_response_completes() -> None:
    async with sim() as s:
        queued = await s.openai.responses.create(model=MODEL, input="later", background=True)

        async def done() -> bool:
            return (await s.openai.responses.retrieve(queued.id)).status == "completed"

        await wait_for(done, timeout=5, what="the background response")
        assert (await s.openai.responses.retrieve(queued.id)).output_text


async def test_responses_bad_input_is_a_4xx_openai_error() -> None:
    async with sim() as s:
        for body, param in (
            ({"model": MODEL}, "input"),
            ({"model": MODEL, "input": [3]}, "input"),
            ({"model": MODEL, "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
            ({"input": "x"}, "model"),
        ):
            status, answer = await s.post("/v1/responses", body)
            assert status == 400, body
            assert answer["error"]["param"] == param
        status, answer = await s.post("/v1/responses", {"model": "nope", "input": "x"})
        assert status == 404 and answer["error"]["code"] == "model_not_found"


# --- Anthropic Messages ---------------------------------------------------------------------


async def test_messages_non_stream_with_the_anthropic_sdk() -> None:
    async with sim() as s:
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 64,
            "system": INSTRUCTIONS,
            "messages": [{"role": "user", "content": "hello"}],
        }
        raw = await s.anthropic.messages.with_raw_response.create(**kwargs)
        assert raw.headers["x-backend-id"] == "b1"
        cold = await raw.parse()
        assert cold.id.startswith("msg_") and cold.role == "assistant"
        assert cold.stop_reason == "end_turn"
        assert cold.content[0].type == "text" and cold.content[0].text
        assert cold.usage.output_tokens == 16
        assert cold.usage.cache_read_input_tokens == 0
        warm = await s.anthropic.messages.create(**kwargs)
        assert warm.usage.cache_read_input_tokens == cold.usage.input_tokens // 16 * 16 > 0
        assert warm.usage.input_tokens + warm.usage.cache_read_input_tokens == (
            cold.usage.input_tokens
        )
        count = await s.anthropic.messages.count_tokens(
            model=MODEL, system=INSTRUCTIONS, messages=[{"role": "user", "content": "hello"}]
        )
        assert count.input_tokens == cold.usage.input_tokens
        short = await s.anthropic.messages.create(**{**kwargs, "max_tokens": 3})
        assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


async def test_messages_stream_with_the_anthropic_sdk() -> None:
    async with sim() as s:
        messages: Any = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        whole = await s.anthropic.messages.create(model=MODEL, max_tokens=64, messages=messages)
        async with s.anthropic.messages.stream(
            model=MODEL, max_tokens=64, messages=messages
        ) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert "".join(texts) == whole.content[0].text  # type: ignore[union-attr]
        assert final.usage.output_tokens == 16
        assert final.stop_reason == "end_turn"

        raw_types = []
        events = await s.anthropic.messages.create(
            model=MODEL, max_tokens=64, messages=messages, stream=True
        )
        async for event in events:
            raw_types.append(event.type)
        assert raw_types[:2] == ["message_start", "content_block_start"]
        assert raw_types[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_messages_errors_are_anthropic_shaped() -> None:
    async with sim() as s:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await s.anthropic.messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert missing.value.body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "The model `nope` does not exist."},
        }
        status, body = await s.post("/v1/messages", {"model": MODEL, "messages": []})
        assert status == 400
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        await s.post("/admin/fail", {"status": 503})
        with pytest.raises(anthropic.APIStatusError) as failing:
            await s.anthropic.messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert failing.value.status_code == 503
        assert failing.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


# --- embeddings, rerank, score, tokens ------------------------------------------------------


async def test_embeddings_float_and_base64_agree() -> None:
    async with sim() as s:
        texts = ["the cache is warm", "a different sentence entirely"]
        floats = await s.openai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
        assert [d.index for d in floats.data] == [0, 1]
        assert len(floats.data[0].embedding) == 64
        assert floats.usage.prompt_tokens == 8
        # The SDK's default asks for base64 and decodes it into floats.
        default = await s.openai.embeddings.create(model=MODEL, input=texts)
        for a, b in zip(floats.data, default.data, strict=True):
            assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        status, raw = await s.post(
            "/v1/embeddings", {"model": MODEL, "input": texts[0], "encoding_format": "base64"}
        )
        assert status == 200
        decoded = struct.unpack("<64f", base64.b64decode(raw["data"][0]["embedding"]))
        assert list(decoded) == pytest.approx(floats.data[0].embedding, abs=1e-6)
        again = await s.openai.embeddings.create(model=MODEL, input=texts[0], dimensions=8)
        assert len(again.data[0].embedding) == 8
        with pytest.raises(openai.BadRequestError):
            await s.openai.embeddings.create(model=MODEL, input=[])


async def test_rerank_and_score() -> None:
    async with sim() as s:
        documents = ["nothing alike here", "the prefix cache hit rate", "prefix cache"]
        status, body = await s.post(
            "/v1/rerank",
            {"model": MODEL, "query": "prefix cache", "documents": documents, "top_n": 2},
        )
        assert status == 200
        assert [r["index"] for r in body["results"]] == [2, 1]
        assert body["results"][0]["relevance_score"] == pytest.approx(1.0)
        assert body["results"][0]["document"] == {"text": "prefix cache"}
        assert body["usage"]["total_tokens"] > 0

        status, body = await s.post(
            "/v1/score", {"model": MODEL, "text_1": "prefix cache", "text_2": documents}
        )
        assert status == 200 and body["object"] == "list"
        scores = [d["score"] for d in body["data"]]
        assert scores[2] == pytest.approx(1.0) and scores[1] > scores[0]
        status, body = await s.post(
            "/v1/score", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["a", "b", "c"]}
        )
        assert status == 400 and body["error"]["param"] == "text_2"


async def test_tokenize_and_detokenize() -> None:
    async with sim(max_model_len=4096) as s:
        status, body = await s.post("/tokenize", {"model": MODEL, "prompt": "hello, cache world"})
        assert status == 200
        assert body["count"] == 4 and len(body["tokens"]) == 4
        assert body["max_model_len"] == 4096
        status, back = await s.post("/detokenize", {"model": MODEL, "tokens": body["tokens"]})
        assert status == 200 and back == {"prompt": "hello , cache world"}
        status, chat = await s.post(
            "/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert status == 200 and chat["count"] == 3  # "user", ":", "hi"
        status, bad = await s.post("/detokenize", {"model": MODEL, "tokens": [-1]})
        assert status == 400 and bad["error"]["param"] == "tokens"


# --- audio ----------------------------------------------------------------------------------


async def test_audio_transcription_and_translation() -> None:
    async with sim() as s:
        audio = bytes(range(256)) * 200  # 51,200 bytes: 4 words
        first = await s.openai.audio.transcriptions.create(
            model=MODEL, file=("a.wav", audio, "audio/wav")
        )
        second = await s.openai.audio.transcriptions.create(
            model=MODEL, file=("b.wav", audio, "audio/wav"), language="en"
        )
        assert first.text == second.text and len(first.text.split()) == 4
        other = await s.openai.audio.transcriptions.create(
            model=MODEL, file=("c.wav", audio + b"x" * 40_000, "audio/wav")
        )
        assert other.text != first.text
        text = await s.openai.audio.transcriptions.create(
            model=MODEL, file=("a.wav", audio, "audio/wav"), response_format="text"
        )
        assert isinstance(text, str) and text.strip() == first.text
        translated = await s.openai.audio.translations.create(
            model=MODEL, file=("a.wav", audio, "audio/wav")
        )
        assert translated.text == first.text

        form = aiohttp.FormData()
        form.add_field("model", MODEL)
        async with s.http.post(f"{s.backend.base_url}/audio/transcriptions", data=form) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "file"
        with pytest.raises(openai.NotFoundError):
            await s.openai.audio.transcriptions.create(
                model="nope", file=("a.wav", audio, "audio/wav")
            )


# --- LoRA -----------------------------------------------------------------------------------


async def test_lora_adapters_are_listed_routed_and_cached_apart() -> None:
    async with sim("b1", lora={"sql": None}) as with_lora, sim("b2") as without:
        listed = {m.id: m for m in (await with_lora.openai.models.list()).data}
        assert set(listed) == {MODEL, "sql"}
        sql = listed["sql"].model_dump()
        assert sql["parent"] == MODEL and sql["root"] == "/adapters/sql"
        assert listed[MODEL].model_dump()["parent"] is None

        prompt = [{"role": "user", "content": INSTRUCTIONS}]
        base = await with_lora.openai.chat.completions.create(model=MODEL, messages=prompt)  # type: ignore[arg-type]
        adapter = await with_lora.openai.chat.completions.create(model="sql", messages=prompt)  # type: ignore[arg-type]
        assert adapter.model == "sql"
        assert base.usage is not None and adapter.usage is not None
        details = adapter.usage.prompt_tokens_details
        assert details is not None and details.cached_tokens == 0  # its own prefix cache
        again = await with_lora.openai.chat.completions.create(model="sql", messages=prompt)  # type: ignore[arg-type]
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        full_blocks = again.usage.prompt_tokens // BLOCK_SIZE * BLOCK_SIZE
        assert again.usage.prompt_tokens_details.cached_tokens == full_blocks > 0

        with pytest.raises(openai.NotFoundError) as not_here:
            await without.openai.chat.completions.create(model="sql", messages=prompt)  # type: ignore[arg-type]
        assert isinstance(not_here.value.body, dict)
        assert not_here.value.body["code"] == "model_not_found"


async def test_lora_adapters_load_and_unload_at_runtime() -> None:
    async with sim() as s:
        body = {"lora_name": "fin", "lora_path": "/models/fin-lora"}
        status, text = await s.post("/v1/load_lora_adapter", body)
        assert status == 200 and "fin" in text
        listed = {m.id: m.model_dump() for m in (await s.openai.models.list()).data}
        assert listed["fin"]["root"] == "/models/fin-lora" and listed["fin"]["parent"] == MODEL
        response = await s.openai.responses.create(model="fin", input="hi")
        assert response.model == "fin"
        status, again = await s.post("/v1/load_lora_adapter", body)
        assert status == 400 and again["error"]["param"] == "lora_name"

        status, _ = await s.post("/v1/unload_lora_adapter", {"lora_name": "fin"})
        assert status == 200
        assert [m.id for m in (await s.openai.models.list()).data] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            await s.openai.responses.create(model="fin", input="hi")
        status, gone = await s.post("/v1/unload_lora_adapter", {"lora_name": "fin"})
        assert status == 404 and "cannot be found" in gone["error"]["message"]


def test_the_lora_option_of_the_command_line() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "affinity_node", "fake-backend", "--port", "0", "--id", "x",
         "--model", MODEL, "--lora", "sql="],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "NAME=PARENT" in bad.stderr and "Traceback" not in bad.stderr
