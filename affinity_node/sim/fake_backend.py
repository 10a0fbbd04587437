"""A vLLM simulator: the OpenAI-compatible API, prefix caching, a capacity model and faults.

It lets the demo, the benchmarks and the tests run a fleet on one machine without GPUs while
keeping what matters to affinity routing: time to first token grows with the prompt tokens
that miss the prefix cache, the cache is per backend and bounded, and a backend given more
than it can do queues (capacity.py: running slots, a FIFO queue, shared prefill compute, decode
slowing with the batch, KV blocks). Each backend tags its answers (`x-backend-id` header,
`system_fingerprint`) so a caller can see who served it, and faults can be injected at start
or at runtime through `POST /admin/fail`. Every metric carries vLLM's own name.

Besides chat and completions it speaks the rest of the API real clients use, each in its own
module on this one's generation core: Responses with a per-server store
(responses_routes.py), Anthropic Messages (anthropic_api.py), embeddings, rerank, score,
tokenize and audio (extra_api.py), LoRA adapters (lora.py).

A request body's `sim_pad_bytes` (simulator only) pads a non-streamed chat or completion
answer's text with that many spaces, at no decode time: large answers for proxy tests.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from affinity_node.sim.anthropic_api import MessagesRoutes
from affinity_node.sim.backend_metrics import BackendMetrics
from affinity_node.sim.capacity import CapacityModel, Engine
from affinity_node.sim.extra_api import ExtraRoutes
from affinity_node.sim.lora import LoraRoutes, ServedModels
from affinity_node.sim.prefix_cache import PrefixCache, stable_hash, tokenize
from affinity_node.sim.responses_routes import ResponsesRoutes
from affinity_node.sim.vllm_api import (
    ApiError,
    Event,
    Job,
    Kind,
    full_body,
    injected_error,
    parse_job,
    sse,
    stream_events,
)

MAX_BODY_BYTES: Final = 32 * 1024 * 1024
"""Audio uploads are multipart bodies of up to 25 MB at OpenAI; JSON bodies fit too."""

_WORDS: Final = (
    "the", "cache", "block", "prefix", "token", "model", "request", "answer", "node", "route",
    "fleet", "key", "stream", "batch", "query", "value", "layer", "vector", "shard", "queue",
    "warm", "cold", "hit", "miss", "fast", "slow", "data", "graph", "signal", "state",
)  # fmt: skip

_SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass
class FakeBackendConfig:
    """How one simulated vLLM server behaves; times are in seconds."""

    backend_id: str
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    cache_blocks: int = 2048
    """Prefix-cache size in 16-token blocks (an LRU)."""
    ttft_base_s: float = 0.005
    """Time from admission to the first token besides the prefill (not shared)."""
    prefill_s_per_token: float = 0.00002
    """Prefill compute per uncached token: alone, a request prefills at 1/this tokens/s;
    k requests prefilling at once share it (each at 1/k)."""
    tokens_per_s: float = 2000.0
    """Output rate of a request decoding alone (streamed or not)."""
    decode_slowdown: float = 0.02
    """Each other running request makes a decode step this much longer (0.02: 64 running
    requests decode 2.26x slower than one)."""
    output_tokens: int = 16
    """Answer length; a smaller `max_tokens` in the request truncates it."""
    max_running: int = 64
    """Requests running at once; the others wait FIFO (`num_requests_waiting`)."""
    kv_cache_blocks: int | None = None
    """KV blocks that running requests hold (prompt + output); a request waits until its
    blocks fit (one larger than the pool runs alone). None: as many as `cache_blocks` (vLLM
    has one pool for both; here the prefix cache's LRU is not shrunk by running requests),
    so a backend with a tiny prefix cache also runs few requests at once: give it its own."""
    seed: int = 0
    fail_status: int | None = None
    """Answer every completion with this status and an OpenAI error body."""
    drop_after_chunks: int | None = None
    """Close a stream's connection abruptly after this many SSE events."""
    lora: Mapping[str, str | None] = field(default_factory=dict)
    """LoRA adapters served from the start: name -> base model (None: the first model)."""
    max_model_len: int = 32768
    """Reported by /v1/models and /tokenize."""
    response_store_size: int = 10_000
    """Responses kept for `previous_response_id` and GET (an LRU, in memory, as vLLM)."""


@dataclass
class FakeBackendStats:
    """Plain counters for tests, e.g. to see that a proxy cancelled its upstream request."""

    requests: int = 0
    """Completion requests received (including the ones answered with an error)."""
    completed: int = 0
    disconnects: int = 0
    """Requests whose client went away before the answer was complete."""
    injected_failures: int = 0
    dropped_streams: int = 0
    running: int = 0
    """Requests holding a slot now (refreshed by the engine on every change)."""
    waiting: int = 0
    """Requests queued for a slot now."""
    max_waiting: int = 0
    """The longest queue seen since start."""
    last_body: bytes = b""
    """The last completion request's body as received (what a proxy forwarded)."""
    last_headers: dict[str, str] = field(default_factory=dict)
    """The last completion request's headers as received (names lowercased)."""


@dataclass
class FailureMode:
    """Faults in force; changed at runtime by `POST /admin/fail`."""

    status: int | None = None
    drop_after_chunks: int | None = None


@dataclass
class Generation:
    """One admitted request's answer: the simulator knows the whole output at admission."""

    model: str
    label: str
    """The base model: vLLM labels an adapter's requests with it."""
    tokens: list[str]
    finish: str
    """"stop" or "length" (vLLM's finish reasons; each API renames them)."""
    prompt_tokens: int
    cached_tokens: int
    arrival: float

    @property
    def text(self) -> str:
        return "".join(self.tokens)


class FakeBackend:
    """The state of one simulated vLLM server, its generation core and its chat handlers.

    The other APIs (responses_api, anthropic_api, extra_api) are handlers on top of the
    same core: `read_body` (counts, injected faults), `generating` (slot, prefix cache,
    prefill), then `finish_whole` or `send_events`.
    """

    def __init__(self, cfg: FakeBackendConfig) -> None:
        self.cfg = cfg
        self.capacity = capacity_model(cfg)
        self.stats = FakeBackendStats()
        self.failure = FailureMode(cfg.fail_status, cfg.drop_after_chunks)
        self.cache = PrefixCache(cfg.cache_blocks)
        self.engine = Engine(self.capacity, on_change=self._engine_changed)
        self.metrics = BackendMetrics(cfg.models, self.engine)
        self.served = ServedModels(cfg.models, cfg.lora)
        self._created = int(time.time())

    def _engine_changed(self) -> None:
        self.stats.running = self.engine.running
        self.stats.waiting = self.engine.waiting
        self.stats.max_waiting = max(self.stats.max_waiting, self.stats.waiting)

    # --- plumbing -------------------------------------------------------------------------

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Tags every response, streamed ones included (a middleware would be too late)."""
        response.headers["x-backend-id"] = self.cfg.backend_id
        request_id = request.headers.get("x-request-id")
        if request_id is not None:
            response.headers["x-request-id"] = request_id

    def text_for(self, prompt: str, n_tokens: int) -> list[str]:
        """Deterministic output tokens for (seed, prompt)."""
        rng = random.Random(self.cfg.seed ^ stable_hash(prompt))
        words = [rng.choice(_WORDS) for _ in range(n_tokens)]
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    async def read_body(self, request: web.Request) -> Any:
        """The request's JSON, counted; raises ApiError for bad JSON or an injected fault."""
        self.stats.requests += 1
        self.stats.last_headers = {k.lower(): v for k, v in request.headers.items()}
        self.stats.last_body = await request.read()
        try:
            body = json.loads(self.stats.last_body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise ApiError(400, "the request body is not valid JSON") from None
        self.check_failure()
        return body

    def check_failure(self) -> None:
        if self.failure.status is not None:
            self.stats.injected_failures += 1
            raise injected_error(self.failure.status)

    def check_model(self, model: Any, param: str = "model") -> str:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required", param=param)
        if model not in self.served:
            raise ApiError(
                404, f"The model `{model}` does not exist.", param=param, code="model_not_found"
            )
        return model

    # --- the generation core --------------------------------------------------------------

    @asynccontextmanager
    async def generating(
        self, model: str, prompt_text: str, max_tokens: int | None, arrival: float
    ) -> AsyncIterator[Generation]:
        """Holds a running slot from admission to the end of the block, with the prefill
        done and the first token due (TTFT grows with the tokens the prefix cache misses)."""
        label = self.served.base_of(model)
        prompt = tokenize(prompt_text)
        n_out, finish = self.cfg.output_tokens, "stop"
        if max_tokens is not None and max_tokens < n_out:
            n_out, finish = max_tokens, "length"
        async with self.engine.slot(len(prompt), n_out, label) as ticket:
            if ticket.admitted_at is not None:
                self.metrics.queue_time.labels(model_name=label).observe(
                    max(ticket.admitted_at - ticket.arrival, 0.0)
                )
            # Looked up when admitted, as vLLM's scheduler does: a queued request can hit
            # blocks that an earlier one brought in meanwhile. The chain starts from the
            # model's name, so an adapter never shares blocks with its base model.
            cached, total = self.cache.lookup_and_insert(prompt, model)
            self.metrics.queries.labels(model_name=label).inc(total)
            self.metrics.hits.labels(model_name=label).inc(cached)
            tokens = self.text_for(prompt_text, n_out)
            await self.engine.prefill(total - cached)
            await asyncio.sleep(self.capacity.ttft_base_s)
            yield Generation(model, label, tokens, finish, total, cached, arrival)

    async def finish_whole(self, request: web.Request | None, gen: Generation) -> bool:
        """Decodes a non-streamed answer; False when the client has gone meanwhile."""
        self.metrics.ttft.labels(model_name=gen.label).observe(time.monotonic() - gen.arrival)
        await self._decode(len(gen.tokens) - 1)  # the first token came with the prefill
        if request is not None and (request.transport is None or request.transport.is_closing()):
            self.stats.disconnects += 1  # without handler cancellation we learn it here
            return False
        self.stats.completed += 1
        self.metrics.e2e.labels(model_name=gen.label).observe(time.monotonic() - gen.arrival)
        return True

    async def _decode(self, n_tokens: int, per_wakeup: int = 8) -> None:
        """Decode time of a non-streamed answer: a few tokens per timer, each step sized by
        the batch running at that moment."""
        while n_tokens > 0:
            k = min(per_wakeup, n_tokens)
            await asyncio.sleep(k * self.engine.decode_step_s())
            n_tokens -= k

    async def send_events(
        self,
        request: web.Request,
        gen: Generation,
        events: list[Event],
        on_complete: Callable[[], None] | None = None,
    ) -> web.StreamResponse:
        """Streams `events`, one decode step before each output token's event.

        `on_complete` runs once the last event is written, e.g. to store a streamed
        response.
        """
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await response.prepare(request)
            due = time.monotonic()
            for sent, (index, data) in enumerate(events):
                drop = self.failure.drop_after_chunks  # read live: tests break running streams
                if drop is not None and sent >= drop:
                    self.stats.dropped_streams += 1
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if index is not None and index > 0:
                    # One decode step per token, as long as the batch running right now
                    # makes it; due times add up, so a late wakeup does not slow the rest.
                    due += self.engine.decode_step_s()
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await response.write(data)
                if sent == 0:
                    self.metrics.ttft.labels(model_name=gen.label).observe(
                        time.monotonic() - gen.arrival
                    )
        except ConnectionResetError:
            # Without handler cancellation a gone client shows up as a failed write.
            self.stats.disconnects += 1
            return response
        self.stats.completed += 1
        self.metrics.e2e.labels(model_name=gen.label).observe(time.monotonic() - gen.arrival)
        if on_complete is not None:
            on_complete()
        return response

    async def guarded(self, work: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Awaits a handler's work, counting a client that went away (handler cancellation:
        the work stops there, quietly)."""
        try:
            return await work
        except asyncio.CancelledError:
            self.stats.disconnects += 1
            raise

    # --- simple endpoints -----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = self.served.listing(self._created, self.cfg.max_model_len)
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if self.failure.status is not None:
            return web.Response(status=503, text="failing")
        return web.Response(text="ok")

    async def prometheus(self, request: web.Request) -> web.Response:
        # Always the text format, whatever Accept asks: prometheus-client's OpenMetrics writer
        # turns "vllm:x" into "vllm_x" (client_python#1177), and the names must be vLLM's.
        # content_type= would reject the charset part, hence the raw header.
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        return web.Response(body=generate_latest(self.metrics.metrics_registry), headers=headers)

    async def admin_fail(self, request: web.Request) -> web.Response:
        """Replaces the failure mode: {"status": 503}, {"drop_after_chunks": 2}, {} heals."""
        try:
            body = await request.json()
        except ValueError:
            return ApiError(400, "invalid JSON").response()
        if not isinstance(body, dict):
            return ApiError(400, "the body must be a JSON object").response()
        status = body.get("status")
        drop = body.get("drop_after_chunks")
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            return ApiError(400, "status must be an HTTP error status", param="status").response()
        if drop is not None and (not isinstance(drop, int) or drop < 0):
            error = ApiError(400, "drop_after_chunks must be >= 0", param="drop_after_chunks")
            return error.response()
        self.failure = FailureMode(status, drop)
        return web.json_response(asdict(self.failure))

    async def admin_clear_cache(self, request: web.Request) -> web.Response:
        """Empties the prefix cache, e.g. between benchmark rounds."""
        self.cache.clear()
        return web.json_response({"cleared": True})

    # --- completions ----------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, "completion")

    async def _complete(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        arrival = time.monotonic()
        try:
            body = await self.read_body(request)
            job = parse_job(kind, body, self.served.names())
        except ApiError as exc:
            return exc.response()
        return await self.guarded(self._run(request, job, arrival))

    async def _run(self, request: web.Request, job: Job, arrival: float) -> web.StreamResponse:
        async with self.generating(job.model, job.prompt, job.max_tokens, arrival) as gen:
            n_out = len(gen.tokens)
            usage = {
                "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": n_out,
                "total_tokens": gen.prompt_tokens + n_out,
                "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
            }
            fingerprint = self.cfg.backend_id
            if job.stream:
                chunks = stream_events(job, gen.tokens, gen.finish, usage, fingerprint)
                events: list[Event] = [(index, sse(data)) for index, data in chunks]
                events.append((None, b"data: [DONE]\n\n"))
                return await self.send_events(request, gen, events)
            await self.finish_whole(request, gen)
            text = gen.text + " " * job.pad_bytes
            return web.json_response(full_body(job, text, gen.finish, usage, fingerprint))


def capacity_model(cfg: FakeBackendConfig) -> CapacityModel:
    """The engine's model from a backend's config (KV pool defaults to the cache's size)."""
    return CapacityModel(
        max_running=cfg.max_running,
        prefill_s_per_token=cfg.prefill_s_per_token,
        ttft_base_s=cfg.ttft_base_s,
        decode_tokens_per_s=cfg.tokens_per_s,
        decode_slowdown=cfg.decode_slowdown,
        kv_cache_blocks=cfg.kv_cache_blocks
        if cfg.kv_cache_blocks is not None
        else max(cfg.cache_blocks, 1),
    )


FAKE_BACKEND_KEY: Final = web.AppKey("fake_backend", FakeBackend)
STATS_KEY: Final = web.AppKey("fake_backend_stats", FakeBackendStats)


def make_app(cfg: FakeBackendConfig) -> web.Application:
    """The aiohttp application of one simulated backend (run it with handler_cancellation)."""
    backend = FakeBackend(cfg)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[FAKE_BACKEND_KEY] = backend
    app[STATS_KEY] = backend.stats
    app.on_response_prepare.append(backend.on_prepare)
    app.router.add_get("/v1/models", backend.models)
    app.router.add_post("/v1/chat/completions", backend.chat_completions)
    app.router.add_post("/v1/completions", backend.completions)
    LoraRoutes(backend.served).add_to(app)
    ResponsesRoutes(backend).add_to(app)
    MessagesRoutes(backend).add_to(app)
    ExtraRoutes(backend).add_to(app)
    app.router.add_get("/health", backend.health)
    app.router.add_get("/metrics", backend.prometheus)
    app.router.add_post("/admin/fail", backend.admin_fail)
    app.router.add_post("/admin/cache/clear", backend.admin_clear_cache)
    return app


@dataclass
class RunningFakeBackend:
    """A started fake backend; `await close()` (or `async with`) stops it."""

    app: web.Application
    runner: web.AppRunner
    host: str
    port: int
    _closed: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (with `/v1`)."""
        return self.url + "/v1"

    @property
    def backend(self) -> FakeBackend:
        return self.app[FAKE_BACKEND_KEY]

    @property
    def stats(self) -> FakeBackendStats:
        return self.app[STATS_KEY]

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.runner.cleanup()

    async def __aenter__(self) -> RunningFakeBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve(cfg: FakeBackendConfig) -> RunningFakeBackend:
    """Starts a backend on cfg.host:cfg.port (0 picks a free port) and returns at once."""
    app = make_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return RunningFakeBackend(app, runner, cfg.host, port)
