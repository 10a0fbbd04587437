"""The agents workload (sim/agents.py) against in-process fake backends on loopback: chains
linked by previous_response_id grow on the backend that stores them, tool calls are answered,
and a spread that ignores owners loses chains, which the agent recovers by resending."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from affinity_node.sim.agents import AgentRecord, AgentsConfig, AgentsWorkload, chain_failures
from affinity_node.sim.fake_backend import FakeBackendConfig, RunningFakeBackend, make_app
from affinity_node.sim.responses_api import TOOL_TRIGGER

MODEL = "llama-3.1-8b"
SECRET = "sk-agents-secret-never-logged"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorder:
    """Every /v1/responses body the backends received, by x-request-id."""

    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/responses":
            self.bodies[request.headers["x-request-id"]] = await request.json()
        return await handler(request)


@pytest.fixture
async def backends() -> AsyncIterator[tuple[list[RunningFakeBackend], Recorder]]:
    recorder = Recorder()
    running = []
    try:
        for i in range(2):
            app = make_app(FakeBackendConfig(backend_id=f"b{i}", models=[MODEL], output_tokens=8))
            app.middlewares.append(recorder.middleware)
            runner = web.AppRunner(app, handler_cancellation=True)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            running.append(RunningFakeBackend(app, runner, "127.0.0.1", runner.addresses[0][1]))
        yield running, recorder
    finally:
        for b in running:
            await b.close()


def config(urls: list[str], **kw: Any) -> AgentsConfig:
    base: dict[str, Any] = dict(
        base_urls=tuple(urls),
        api_keys=(SECRET,),
        model=MODEL,
        tenants=2,
        sessions_per_tenant=2,
        turns_per_chain=6,
        instructions_tokens=(200, 300),
        tool_output_tokens=(40, 80),
        tool_share=0.5,
        max_output_tokens=8,
        think_s=0.01,
        duration_s=1.5,
        seed=3,
    )
    base.update(kw)
    return AgentsConfig(**base)


def agent_records(records: list[Any]) -> list[AgentRecord]:
    assert all(isinstance(r, AgentRecord) for r in records)
    return list(records)


async def test_chains_grow_on_their_backend_with_tool_turns(backends):
    (b0, _), recorder = backends
    result = await AgentsWorkload(config([b0.url])).run()
    records = agent_records(result.records)
    assert len(records) >= 20 and result.errors == 0 and chain_failures(records) == 0
    by_id = {f"agents-3-{r.seq}": r for r in records}
    assert set(recorder.bodies) == set(by_id)
    chained = calls = 0
    last_prompt: dict[str, int] = {}
    for request_id, body in recorder.bodies.items():
        record = by_id[request_id]
        assert body["stream"] is True and body["store"] is True and len(body["tools"]) == 2
        assert len(body["input"]) == 1  # only what is new: the context lives on the server
        assert body["prompt_cache_key"] == record.conversation
        item = body["input"][0]
        if record.turn == 1:
            assert "previous_response_id" not in body and item["type"] == "message"
        else:
            assert body["previous_response_id"].startswith("resp_")
            chained += 1
            # The server put the stored conversation first: the prompt grew, and the
            # prefix cache served what it had seen.
            assert record.prompt_tokens is not None and record.cached_tokens is not None
            assert record.prompt_tokens > last_prompt[record.conversation]
            assert record.cached_tokens >= last_prompt[record.conversation] - 16
        if item["type"] == "function_call_output":
            calls += 1
            assert item["call_id"].startswith("call_")
        assert record.ttft_s is not None and 0 < record.ttft_s <= record.latency_s
        last_prompt[record.conversation] = record.prompt_tokens or 0
    assert chained >= 10 and calls >= 2
    asked = [b for b in recorder.bodies.values() if TOOL_TRIGGER in str(b["input"][0])]
    assert len(asked) >= calls  # every function_call_output answers a call asked for


async def test_a_spread_without_owners_loses_chains_and_the_agent_resends(backends):
    (b0, b1), recorder = backends
    result = await AgentsWorkload(config([b0.url, b1.url])).run()
    records = agent_records(result.records)
    failures = [r for r in records if r.chain_failure]
    assert failures and chain_failures(records) == len(failures)
    # A chain failure is an error (404), the only kind here.
    assert result.errors == len(failures)
    assert all(r.status == 404 and "chain failure" in (r.error or "") for r in failures)
    ids = {r.seq: f"agents-3-{r.seq}" for r in records}
    for failure in failures:
        assert "previous_response_id" in recorder.bodies[ids[failure.seq]]
        # Each one is followed at once by the whole conversation, without the lost id.
        resend = next(
            r for r in records if r.seq > failure.seq and r.conversation == failure.conversation
        )
        assert resend.resend and resend.turn == failure.turn
        body = recorder.bodies[ids[resend.seq]]
        assert "previous_response_id" not in body
        lost = recorder.bodies[ids[failure.seq]]["input"]
        assert len(body["input"]) > len(lost) and body["input"][-len(lost) :] == lost
    assert any(r.ok and r.resend for r in records)
