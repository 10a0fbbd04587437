"""The chat workload generator against an in-process fake backend."""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from affinity_node.sim.fake_backend import (
    FAKE_BACKEND_KEY,
    FakeBackendConfig,
    RunningFakeBackend,
    make_app,
)
from affinity_node.sim.prefix_cache import tokenize
from affinity_node.sim.workload import (
    LiveStats,
    Workload,
    WorkloadConfig,
    arrival_times,
    build_conversations,
    estimate_working_set_blocks,
    system_prompt,
)

MODEL = "llama-3.1-8b"
SECRET = "sk-test-secret-never-logged"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Recorder:
    """Every completion request body the backend received, with its x-request-id."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.auth: set[str] = set()
        self.sessions: list[str | None] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            self.bodies.append((request.headers.get("x-request-id", ""), await request.json()))
            self.auth.add(request.headers.get("Authorization", ""))
            self.sessions.append(request.headers.get("x-session-id"))
        return await handler(request)


@pytest.fixture
async def backend() -> AsyncIterator[tuple[RunningFakeBackend, Recorder]]:
    recorder = Recorder()
    app = make_app(FakeBackendConfig(backend_id="b0", models=[MODEL], output_tokens=8))
    app.middlewares.append(recorder.middleware)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    running = RunningFakeBackend(app, runner, "127.0.0.1", int(runner.addresses[0][1]))
    try:
        yield running, recorder
    finally:
        await running.close()


def config(url: str, **kw: Any) -> WorkloadConfig:
    base: dict[str, Any] = dict(
        base_urls=(url,),
        api_keys=(SECRET,),
        models=(MODEL,),
        tenants=3,
        conversations_per_tenant=2,
        max_turns=4,
        system_tokens=(300, 400),
        user_tokens=(8, 12),
        max_tokens=8,
        rate=None,
        concurrency=2,
        duration_s=10.0,
        max_requests=24,
        seed=7,
    )
    base.update(kw)
    return WorkloadConfig(**base)


def chat_prompt(messages: list[dict[str, str]]) -> str:
    """How the fake backend flattens a chat (fake_backend._prompt_text)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


# -- texts and conversations ---------------------------------------------------------------


def test_texts_are_deterministic_long_and_per_tenant():
    a = system_prompt(1, 0, 500)
    assert a == system_prompt(1, 0, 500)
    assert a != system_prompt(1, 1, 500) and a != system_prompt(2, 0, 500)
    assert 480 <= len(tokenize(a)) <= 520
    cfg = config("http://127.0.0.1:1", tenants=4, conversations_per_tenant=3)
    convs = build_conversations(cfg)
    assert len(convs) == 12
    assert [c.name for c in convs] == [c.name for c in build_conversations(cfg)]
    # A tenant's conversations share its system prompt (the prefix worth caching) ...
    by_tenant: dict[int, set[str]] = {}
    for c in convs:
        by_tenant.setdefault(c.tenant, set()).add(c.system)
    assert all(len(s) == 1 for s in by_tenant.values())
    # ... and tenants never share one.
    assert len({c.system for c in convs}) == 4


def test_secrets_stay_out_of_the_config_repr():
    assert SECRET not in repr(config("http://127.0.0.1:1"))


async def test_each_turn_resends_the_whole_history_with_the_real_replies(backend):
    running, recorder = backend
    workload = Workload(config(running.url, max_requests=30))
    result = await workload.run()
    assert result.errors == 0 and len(result.records) == 30
    assert recorder.auth == {f"Bearer {SECRET}"}
    fake = running.app[FAKE_BACKEND_KEY]
    record_by_id = {f"wl-7-{r.seq}": r for r in result.records}
    last: dict[str, list[dict[str, str]]] = {}
    grew = 0
    for request_id, body in recorder.bodies:
        record = record_by_id[request_id]
        messages = body["messages"]
        assert body["stream"] is True and body["model"] == MODEL
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        assert len(tokenize(messages[0]["content"])) >= 300
        prev = last.get(record.conversation)
        if prev is None:
            assert len(messages) == 2  # system + the first question
            assert record.turn == 1
        else:
            # The previous prompt, then the answer the backend actually streamed, then more.
            reply = "".join(fake.text_for(chat_prompt(prev), 8))
            assert messages[: len(prev)] == prev
            assert messages[len(prev)] == {"role": "assistant", "content": reply}
            assert len(messages) == len(prev) + 2
            assert record.turn == len(messages) // 2
            grew += 1
        last[record.conversation] = messages
    assert grew >= 10
    # Every record carries what the client saw, never the key.
    for r in result.records:
        assert r.status == 200 and r.backend_id == "b0" and r.ttft_s is not None
        assert 0 < r.ttft_s <= r.latency_s
        assert r.prompt_tokens is not None and r.cached_tokens is not None
        assert SECRET not in repr(r)


async def test_a_conversation_starts_over_after_max_turns(backend):
    running, recorder = backend
    cfg = config(
        running.url,
        tenants=1,
        conversations_per_tenant=1,
        max_turns=3,
        concurrency=1,
        max_requests=7,
    )
    result = await Workload(cfg).run()
    assert [r.conversation for r in result.records] == ["t0/c0/g0"] * 3 + ["t0/c0/g1"] * 3 + [
        "t0/c0/g2"
    ]
    sizes = [len(body["messages"]) for _, body in recorder.bodies]
    assert sizes == [2, 4, 6, 2, 4, 6, 2]


async def test_same_seed_same_requests(backend):
    running, recorder = backend
    cfg = config(running.url, concurrency=1, max_requests=10)
    await Workload(cfg).run()
    first = [body for _, body in recorder.bodies]
    recorder.bodies.clear()
    await Workload(cfg).run()
    assert [body for _, body in recorder.bodies] == first
    recorder.bodies.clear()
    await Workload(config(running.url, concurrency=1, max_requests=10, seed=8)).run()
    assert [body for _, body in recorder.bodies] != first


async def test_non_streaming_answers_too(backend):
    running, recorder = backend
    result = await Workload(config(running.url, stream=False, max_requests=6)).run()
    assert result.errors == 0
    assert all(body["stream"] is False for _, body in recorder.bodies)
    assert all(r.ttft_s == pytest.approx(r.latency_s, abs=0.05) for r in result.records)


def test_poisson_arrivals_are_seeded_and_about_rate_times_duration():
    for seed in range(5):
        times = arrival_times(50.0, 20.0, 1_000_000, seed)
        expected = 50.0 * 20.0
        assert abs(len(times) - expected) < 4 * math.sqrt(expected), (seed, len(times))
        assert times == sorted(times) and times[0] >= 0 and times[-1] < 20.0
        assert times == arrival_times(50.0, 20.0, 1_000_000, seed)
    assert arrival_times(50.0, 20.0, 10**6, 1) != arrival_times(50.0, 20.0, 10**6, 2)
    assert len(arrival_times(50.0, 20.0, 17, 1)) == 17
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.15)


async def test_open_loop_sends_every_seeded_arrival(backend):
    running, _ = backend
    cfg = config(
        running.url, rate=80.0, concurrency=None, duration_s=1.5, tenants=8, max_requests=1000
    )
    expected = len(arrival_times(80.0, 1.5, 1000, cfg.seed))
    assert abs(expected - 120) < 4 * math.sqrt(120)
    seen: list[LiveStats] = []
    result = await Workload(cfg).run(
        progress=lambda s: seen.append(LiveStats(**vars(s))), progress_interval_s=0.2
    )
    assert len(result.records) + result.skipped_arrivals == expected
    assert result.skipped_arrivals == 0
    assert result.errors == 0
    assert 1.4 < result.elapsed_s < 10
    assert seen and seen[-1].sent <= expected


async def test_unreachable_target_is_recorded_and_the_turn_is_retried_later():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workload = Workload(
        config(f"http://127.0.0.1:{port}", max_requests=4, concurrency=1, request_timeout_s=5.0)
    )
    result = await workload.run()
    assert len(result.records) == 4 and result.errors == 4
    assert all(r.status == 0 and r.error for r in result.records)
    # A failed question is dropped: no conversation grew.
    assert all(len(c.messages) == 1 for c in workload.conversations)


def test_working_set_estimate_counts_system_prompts_once_and_every_turn():
    cfg = config(
        "http://127.0.0.1:1",
        tenants=4,
        conversations_per_tenant=2,
        max_turns=5,
        system_tokens=(320, 320),
        user_tokens=(30, 30),
        max_tokens=30,
    )
    per_turn = (30 + 2) + (30 + 2)
    system = sum(len(tokenize(c.system)) + 2 for c in build_conversations(cfg)[::2])
    assert estimate_working_set_blocks(cfg) == math.ceil((system + 4 * 2 * 5 * per_turn) / 16)
    assert estimate_working_set_blocks(cfg, expected_requests=10) == math.ceil(
        (system + 10 * per_turn) / 16
    )


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        config("http://x", rate=5.0, concurrency=2)
    with pytest.raises(ValueError):
        config("http://x", rate=None, concurrency=None)
    with pytest.raises(ValueError):
        WorkloadConfig(base_urls=(), api_keys=("k",))


async def test_warmup_requests_are_flagged_and_the_boundary_hook_runs_once(backend):
    running, _ = backend
    cfg = config(
        running.url, rate=60.0, concurrency=None, warmup_s=0.5, duration_s=0.5, max_requests=1000
    )
    marks: list[float] = []
    workload = Workload(cfg)

    async def boundary() -> None:
        marks.append(workload.stats.sent)

    result = await workload.run(on_measure=boundary)
    assert len(marks) == 1
    warm = [r for r in result.records if r.warmup]
    assert warm and len(result.measured) + len(warm) == len(result.records)
    assert all(r.start_s < 0.5 for r in warm)
    assert all(r.start_s >= 0.5 for r in result.measured)
    assert marks[0] == pytest.approx(len(warm), abs=2)  # sent by the time the hook ran
    assert result.measured_s == pytest.approx(result.elapsed_s - 0.5)


@pytest.mark.parametrize("where", ["prompt_cache_key", "x-session-id", "none"])
async def test_conversation_key_names_each_conversation(backend, where):
    running, recorder = backend
    cfg = config(running.url, conversation_key=where, max_requests=6, concurrency=1)
    result = await Workload(cfg).run()
    assert result.errors == 0
    names = [r.conversation for r in result.records]
    in_body = [body.get("prompt_cache_key") for _, body in recorder.bodies]
    assert in_body == (names if where == "prompt_cache_key" else [None] * 6)
    assert recorder.sessions == (names if where == "x-session-id" else [None] * 6)
