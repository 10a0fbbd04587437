"""A vLLM simulator: the OpenAI-compatible API, prefix caching, queueing and faults.

It lets the demo, the benchmarks and the tests run a fleet on one machine without GPUs while
keeping what matters to affinity routing: time to first token grows with the prompt tokens
that miss the prefix cache, and the cache is per backend and bounded. Each backend tags its
answers (`x-backend-id` header, `system_fingerprint`) so a caller can see who served it, and
faults can be injected at start or at runtime through `POST /admin/fail`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from affinity_node.sim.prefix_cache import PrefixCache, stable_hash, tokenize

Kind = Literal["chat", "completion"]

TTFT_BUCKETS: Final = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""vLLM's TTFT buckets from 5 ms up: the fake's timings start at a few milliseconds."""

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
    ttft_base_s: float = 0.005
    prefill_s_per_token: float = 0.00002
    tokens_per_s: float = 2000.0
    """Output rate when streaming (and the generation time of a non-streamed answer)."""
    output_tokens: int = 16
    """Answer length; a smaller `max_tokens` in the request truncates it."""
    max_running: int = 64
    """Requests processed at once; the others wait in a queue (`num_requests_waiting`)."""
    seed: int = 0
    fail_status: int | None = None
    """Answer every completion with this status and an OpenAI error body."""
    drop_after_chunks: int | None = None
    """Close a stream's connection abruptly after this many SSE events."""


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
    waiting: int = 0


@dataclass
class FailureMode:
    """Faults in force; changed at runtime by `POST /admin/fail`."""

    status: int | None = None
    drop_after_chunks: int | None = None


class ApiError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status)


def _injected_error(status: int) -> ApiError:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return ApiError(status, f"injected failure (status {status})", kind=kind, code="injected")


@dataclass(frozen=True)
class Job:
    """A parsed completion request."""

    kind: Kind
    model: str
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int | None


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    raise ApiError(400, "message content must be a string or a list of parts", param="messages")


def _prompt_text(kind: Kind, body: dict[str, Any]) -> str:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        lines = []
        for message in messages:
            if not isinstance(message, dict):
                raise ApiError(400, "each message must be an object", param="messages")
            role = message.get("role")
            lines.append(f"{role}: {_message_text(message.get('content'))}\n")
        return "".join(lines)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(p, int) for p in prompt):
            return " ".join(str(p) for p in prompt)  # token ids stand for themselves
    raise ApiError(400, "prompt must be a string or a list of strings or token ids", param="prompt")


def parse_job(kind: Kind, body: Any, models: Sequence[str]) -> Job:
    """Validates a request body as vLLM would, for the parts the simulator uses."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required", param="model")
    if model not in models:
        raise ApiError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    return Job(kind, model, _prompt_text(kind, body), stream, include_usage, max_tokens)


class _Metrics:
    """vLLM's metric names, in a registry of this backend's own (several share a process)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=self.registry,
        )
        self.hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            registry=self.registry,
        )
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests being processed.",
            labels,
            registry=self.registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests queued for a slot.",
            labels,
            registry=self.registry,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "Share of the running slots in use (a stand-in for KV blocks held).",
            labels,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        for model in models:  # every series exists from the first scrape
            for metric in (
                self.queries,
                self.hits,
                self.running,
                self.waiting,
                self.kv_usage,
                self.ttft,
            ):
                metric.labels(model_name=model)


class FakeBackend:
    """The state and handlers of one simulated vLLM server."""

    def __init__(self, cfg: FakeBackendConfig) -> None:
        if cfg.max_running < 1:
            raise ValueError("max_running must be >= 1")
        if cfg.tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be > 0")
        self.cfg = cfg
        self.stats = FakeBackendStats()
        self.failure = FailureMode(cfg.fail_status, cfg.drop_after_chunks)
        self.cache = PrefixCache(cfg.cache_blocks)
        self.metrics = _Metrics(cfg.models)
        self._slots = asyncio.Semaphore(cfg.max_running)
        self._created = int(time.time())

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

    # --- simple endpoints -----------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": m, "object": "model", "created": self._created, "owned_by": "fake-vllm"}
            for m in self.cfg.models
        ]
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
        return web.Response(body=generate_latest(self.metrics.registry), headers=headers)

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
        self.stats.requests += 1
        arrival = time.monotonic()
        try:
            body = await request.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            return ApiError(400, "the request body is not valid JSON").response()
        if self.failure.status is not None:
            self.stats.injected_failures += 1
            return _injected_error(self.failure.status).response()
        try:
            job = parse_job(kind, body, self.cfg.models)
        except ApiError as exc:
            return exc.response()
        try:
            return await self._run(request, job, arrival)
        except asyncio.CancelledError:
            # handler_cancellation=True: the client went away; the work stops here, quietly.
            self.stats.disconnects += 1
            raise

    async def _run(self, request: web.Request, job: Job, arrival: float) -> web.StreamResponse:
        labels = {"model_name": job.model}
        self.stats.waiting += 1
        self.metrics.waiting.labels(**labels).inc()
        try:
            await self._slots.acquire()
        finally:
            self.stats.waiting -= 1
            self.metrics.waiting.labels(**labels).dec()
        self.stats.running += 1
        self.metrics.running.labels(**labels).inc()
        self.metrics.kv_usage.labels(**labels).set(self.stats.running / self.cfg.max_running)
        try:
            cached, total = self.cache.lookup_and_insert(tokenize(job.prompt), job.model)
            self.metrics.queries.labels(**labels).inc(total)
            self.metrics.hits.labels(**labels).inc(cached)
            n_out = self.cfg.output_tokens
            finish = "stop"
            if job.max_tokens is not None and job.max_tokens < n_out:
                n_out, finish = job.max_tokens, "length"
            tokens = self.text_for(job.prompt, n_out)
            usage = {
                "prompt_tokens": total,
                "completion_tokens": n_out,
                "total_tokens": total + n_out,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            prefill = (total - cached) * self.cfg.prefill_s_per_token
            await asyncio.sleep(self.cfg.ttft_base_s + prefill)
            if job.stream:
                return await self._stream(request, job, tokens, finish, usage, arrival)
            self.metrics.ttft.labels(**labels).observe(time.monotonic() - arrival)
            await asyncio.sleep(n_out / self.cfg.tokens_per_s)
            if request.transport is None or request.transport.is_closing():
                self.stats.disconnects += 1  # without handler cancellation we learn it here
            else:
                self.stats.completed += 1
            return web.json_response(self._full_body(job, "".join(tokens), finish, usage))
        finally:
            self.stats.running -= 1
            self.metrics.running.labels(**labels).dec()
            self.metrics.kv_usage.labels(**labels).set(self.stats.running / self.cfg.max_running)
            self._slots.release()

    def _envelope(self, job: Job, id_: str, chunk: bool) -> dict[str, Any]:
        if job.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": id_,
            "object": obj,
            "created": int(time.time()),
            "model": job.model,
            "system_fingerprint": self.cfg.backend_id,
        }

    def _new_id(self, job: Job) -> str:
        return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex

    def _full_body(self, job: Job, text: str, finish: str, usage: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        envelope = self._envelope(job, self._new_id(job), False)
        return {**envelope, "choices": [choice], "usage": usage}

    def _chunks(
        self, job: Job, tokens: list[str], finish: str, usage: dict[str, Any]
    ) -> list[tuple[int | None, dict[str, Any]]]:
        """The SSE events as (output token index to pace by, or None, event body)."""
        id_ = self._new_id(job)

        def event(
            token_index: int | None, piece: str | None, finish_reason: str | None
        ) -> tuple[int | None, dict[str, Any]]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if job.kind == "chat":
                choice["delta"] = {} if piece is None else {"content": piece}
            else:
                choice["text"] = piece or ""
            return token_index, {**self._envelope(job, id_, True), "choices": [choice]}

        events = []
        if job.kind == "chat":
            first = event(None, "", None)
            first[1]["choices"][0]["delta"]["role"] = "assistant"
            events.append(first)
        events.extend(event(i, t, None) for i, t in enumerate(tokens))
        events.append(event(None, None, finish))
        if job.include_usage:
            events.append((None, {**self._envelope(job, id_, True), "choices": [], "usage": usage}))
        return events

    async def _stream(
        self,
        request: web.Request,
        job: Job,
        tokens: list[str],
        finish: str,
        usage: dict[str, Any],
        arrival: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        chunks = self._chunks(job, tokens, finish, usage)
        events = [
            b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
            for _, body in chunks
        ]
        events.append(b"data: [DONE]\n\n")
        pacing = [index for index, _ in chunks] + [None]
        try:
            await response.prepare(request)
            start = time.monotonic()
            for sent, (index, data) in enumerate(zip(pacing, events, strict=True)):
                drop = self.failure.drop_after_chunks  # read live: tests break running streams
                if drop is not None and sent >= drop:
                    self.stats.dropped_streams += 1
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if index is not None and index > 0:
                    delay = start + index / self.cfg.tokens_per_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await response.write(data)
                if sent == 0:
                    self.metrics.ttft.labels(model_name=job.model).observe(
                        time.monotonic() - arrival
                    )
        except ConnectionResetError:
            # Without handler cancellation a gone client shows up as a failed write.
            self.stats.disconnects += 1
            return response
        self.stats.completed += 1
        return response


FAKE_BACKEND_KEY: Final = web.AppKey("fake_backend", FakeBackend)
STATS_KEY: Final = web.AppKey("fake_backend_stats", FakeBackendStats)


def make_app(cfg: FakeBackendConfig) -> web.Application:
    """The aiohttp application of one simulated backend (run it with handler_cancellation)."""
    backend = FakeBackend(cfg)
    app = web.Application()
    app[FAKE_BACKEND_KEY] = backend
    app[STATS_KEY] = backend.stats
    app.on_response_prepare.append(backend.on_prepare)
    app.router.add_get("/v1/models", backend.models)
    app.router.add_post("/v1/chat/completions", backend.chat_completions)
    app.router.add_post("/v1/completions", backend.completions)
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
