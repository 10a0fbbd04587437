"""A multi-tenant chat workload: the traffic shape that makes prefix caching, and so affinity
routing, matter.

Each tenant is one API key with a long system prompt of its own, shared by its conversations.
A conversation grows turn by turn: every request resends the whole history, and the
assistant's reply that comes back is appended before the next turn, exactly as chat
clients do. A backend that served the previous turn holds that history in its prefix cache;
any other backend has to prefill it again. After `max_turns` a conversation starts over
(same tenant, same system prompt, fresh history).

Tenants are equally popular, or follow a Zipf law (`zipf_exponent`): tenant i (from 0) draws
a share proportional to 1 / (i + 1)^s of the arrivals and holds as large a share of the
conversations, as an application with many end users behind one key does; when all of a
Zipf tenant's conversations are busy, a new one opens (another end user arrives) instead of
the arrival going to another tenant. Arrivals are Poisson at a target rate (open loop: load
does not slow down when the servers do) or come from a fixed number of workers (closed
loop). Requests are sent with aiohttp,
streamed by default; time to first token is measured client-side as the time to the first
SSE chunk that carries content. Everything random (texts, arrival times, which conversation
speaks next, which URL) comes from generators seeded by `seed`, so two runs with the same seed
send the same texts on the same schedule; only the interleaving follows the servers' timing.

Secrets never leave this module: records carry the tenant index, not the key.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp

from affinity_node.sim.prefix_cache import BLOCK_SIZE, tokenize

Spread = Literal["round_robin", "random"]
ConversationKey = Literal["none", "prompt_cache_key", "x-session-id"]

CHAT_PATH: Final = "/v1/chat/completions"
ROLE_TOKENS: Final = 2
"""Tokens a message adds besides its content when a server flattens the chat ("role", ":")."""

_VOCAB: Final = (
    "account", "invoice", "policy", "customer", "order", "refund", "shipment", "warranty",
    "support", "ticket", "priority", "escalate", "contract", "renewal", "billing", "payment",
    "region", "service", "schedule", "delivery", "product", "catalog", "inventory", "supplier",
    "request", "approval", "manager", "report", "summary", "detail", "history", "status",
    "always", "never", "politely", "briefly", "clearly", "first", "then", "finally", "check",
    "confirm", "explain", "verify", "record", "update", "answer", "question", "document",
    "limit", "rule", "exception", "case", "number", "date", "amount", "currency", "language",
    "the", "a", "of", "to", "and", "in", "for", "with", "on", "when", "if", "before", "after",
)  # fmt: skip


def filler_text(rng: random.Random, n: int) -> str:
    """n tokens of sentence-like text (words and a full stop every few words)."""
    out: list[str] = []
    count = 0
    while count < n:
        length = min(rng.randint(6, 14), n - count)
        if length >= 2:
            sentence = [rng.choice(_VOCAB) for _ in range(length - 1)]
            out.append(" ".join(sentence).capitalize() + ".")
        else:
            out.append(rng.choice(_VOCAB))
        count += length
    return " ".join(out)


def system_prompt(seed: int, tenant: int, tokens: int) -> str:
    """The tenant's instructions: deterministic, about `tokens` tokens, unique per tenant."""
    rng = random.Random(f"{seed}:system:{tenant}")
    head = f"You are the assistant of tenant {tenant} . Follow these instructions ."
    return head + " " + filler_text(rng, max(tokens - len(tokenize(head)), 1))


def user_message(
    seed: int, tenant: int, conversation: str, turn: int, tokens: tuple[int, int]
) -> str:
    """The question of one turn: its length and words depend on nothing but its place."""
    rng = random.Random(f"{seed}:user:{tenant}:{conversation}:{turn}")
    return f"Turn {turn} : " + filler_text(rng, max(rng.randint(*tokens) - 3, 1))


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send, where, and for how long. Times in seconds."""

    base_urls: tuple[str, ...]
    """Where requests go (a load balancer, or every node: requests are spread over them)."""
    api_keys: tuple[str, ...] = field(repr=False)
    """Secrets; tenant i uses api_keys[i % len]. Fewer keys than tenants: tenants share."""
    models: tuple[str, ...] = ("llama-3.1-8b",)
    tenants: int = 32
    conversations_per_tenant: int = 3
    max_turns: int = 10
    """A conversation starts over (fresh history) after this many answered turns."""
    system_tokens: tuple[int, int] = (400, 700)
    user_tokens: tuple[int, int] = (16, 40)
    max_tokens: int = 32
    """Answer length asked for (`max_tokens`)."""
    rate: float | None = 30.0
    """Poisson arrivals per second (open loop); None for the closed loop of `concurrency`."""
    concurrency: int | None = None
    duration_s: float = 18.0
    """Measured seconds of arrivals, after the warm-up."""
    warmup_s: float = 0.0
    """Seconds of the same load before the measured part: requests that start in it are
    flagged `warmup` and left out of the report (caches and bindings settle first)."""
    max_requests: int = 100_000
    stream: bool = True
    seed: int = 1
    spread: Spread = "round_robin"
    request_timeout_s: float = 60.0
    max_inflight: int = 512
    """Open loop only: arrivals beyond this many requests in flight are skipped (counted)."""
    zipf_exponent: float | None = None
    """None: every tenant equally popular. s: tenant i draws 1/(i+1)^s of the arrivals and
    of the `tenants * conversations_per_tenant` conversations (at least one each)."""
    conversation_key: ConversationKey = "none"
    """What names a conversation to the router: nothing (the proxy hashes its opening), the
    body's `prompt_cache_key`, or an `x-session-id` header."""

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("at least one base URL is needed")
        if not self.api_keys:
            raise ValueError("at least one API key is needed")
        if not self.models:
            raise ValueError("at least one model is needed")
        if self.tenants < 1 or self.conversations_per_tenant < 1 or self.max_turns < 1:
            raise ValueError("tenants, conversations_per_tenant and max_turns must be >= 1")
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.duration_s <= 0 or self.max_requests < 1:
            raise ValueError("duration_s must be > 0 and max_requests >= 1")
        if self.warmup_s < 0:
            raise ValueError("warmup_s must be >= 0")
        if self.zipf_exponent is not None and self.zipf_exponent < 0:
            raise ValueError("zipf_exponent must be >= 0")

    def popularity(self) -> list[float]:
        """Each tenant's share of the arrivals (sums to 1)."""
        return zipf_weights(self.tenants, self.zipf_exponent or 0.0)

    def conversation_counts(self) -> list[int]:
        """Conversations each tenant starts with."""
        if self.zipf_exponent is None:
            return [self.conversations_per_tenant] * self.tenants
        total = self.tenants * self.conversations_per_tenant
        return [max(1, round(total * p)) for p in self.popularity()]


def zipf_weights(n: int, exponent: float) -> list[float]:
    """Shares proportional to 1/(i+1)^exponent for i < n, normalised (0: uniform)."""
    raw = [1.0 / (i + 1) ** exponent for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class Conversation:
    """One chat: its history as sent, and whether a turn is in flight (one at a time)."""

    tenant: int
    slot: int
    model: str
    system: str
    generation: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0
    busy: bool = False

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "system", "content": self.system}]

    @property
    def name(self) -> str:
        return f"t{self.tenant}/c{self.slot}/g{self.generation}"

    def ask(self, text: str) -> list[dict[str, str]]:
        """Appends the user's message; returns the whole history to send (a copy)."""
        self.messages.append({"role": "user", "content": text})
        return [dict(m) for m in self.messages]

    def answered(self, reply: str, max_turns: int) -> None:
        self.messages.append({"role": "assistant", "content": reply})
        self.turns += 1
        if self.turns >= max_turns:
            self.generation += 1
            self.turns = 0
            self.messages = [{"role": "system", "content": self.system}]

    def failed(self) -> None:
        """Drops the unanswered question: the next turn asks again from the same history."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


def build_conversations(cfg: WorkloadConfig) -> list[Conversation]:
    rng = random.Random(f"{cfg.seed}:sizes")
    out: list[Conversation] = []
    for tenant, count in enumerate(cfg.conversation_counts()):
        system = system_prompt(cfg.seed, tenant, rng.randint(*cfg.system_tokens))
        for slot in range(count):
            model = cfg.models[(tenant + slot) % len(cfg.models)]
            out.append(Conversation(tenant, slot, model, system))
    return out


def estimate_working_set_blocks(
    cfg: WorkloadConfig, reply_tokens: int | None = None, expected_requests: int | None = None
) -> int:
    """Distinct 16-token prefix blocks of every tenant's conversations over a run.

    System prompts count once per tenant (its conversations share them); every answered turn
    adds a question and an answer. With `expected_requests` that many turns are counted
    (conversations that start over add new blocks too); without it every conversation is
    counted at its full length. Used to size fake backends' caches like a real fleet's: each
    holds a fraction of this, all of them together hold it.
    """
    reply = cfg.max_tokens if reply_tokens is None else min(reply_tokens, cfg.max_tokens)
    per_turn = (sum(cfg.user_tokens) / 2 + ROLE_TOKENS) + (reply + ROLE_TOKENS)
    rng = random.Random(f"{cfg.seed}:sizes")
    total = 0.0
    for tenant in range(cfg.tenants):
        system = len(tokenize(system_prompt(cfg.seed, tenant, rng.randint(*cfg.system_tokens))))
        total += system + ROLE_TOKENS
    turns = (
        sum(cfg.conversation_counts()) * cfg.max_turns
        if expected_requests is None
        else expected_requests
    )
    total += turns * per_turn
    return math.ceil(total / BLOCK_SIZE)


def arrival_times(rate: float, duration_s: float, max_requests: int, seed: int) -> list[float]:
    """Offsets of Poisson arrivals in [0, duration_s): exponential gaps, at most max_requests."""
    rng = random.Random(f"{seed}:arrivals")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and len(out) < max_requests:
        out.append(t)
        t += rng.expovariate(rate)
    return out


@dataclass
class RequestRecord:
    """One request as the client saw it. `status` 0: no HTTP answer (connection, timeout)."""

    seq: int
    tenant: int
    conversation: str
    turn: int
    model: str
    target: int
    """Index of the base URL it was sent to."""
    start_s: float
    """Offset from the start of the run."""
    status: int = 0
    ttft_s: float | None = None
    latency_s: float = 0.0
    backend_id: str | None = None
    affinity: str | None = None
    node_id: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    """From the answer's usage (`prompt_tokens_details.cached_tokens`) when the server sends it."""
    error: str | None = None
    warmup: bool = False
    """Started during the warm-up: not part of the measured figures."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LiveStats:
    """Counters the progress line reads while the run goes on."""

    elapsed_s: float = 0.0
    sent: int = 0
    done: int = 0
    errors: int = 0
    inflight: int = 0
    skipped: int = 0
    opened: int = 0
    """Conversations opened during the run (Zipf: all of a tenant's were busy)."""


@dataclass
class WorkloadResult:
    records: list[RequestRecord]
    """Every request, the warm-up's included (flagged)."""
    elapsed_s: float
    skipped_arrivals: int
    """Open loop: arrivals dropped because every conversation was busy or max_inflight hit."""
    warmup_s: float = 0.0

    @property
    def measured(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.warmup]

    @property
    def measured_s(self) -> float:
        """Seconds from the end of the warm-up to the last answer."""
        return max(self.elapsed_s - self.warmup_s, 0.0)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if not r.ok)


ProgressCallback = Callable[[LiveStats], None]


class Workload:
    """Runs one workload; `stats` is live while `run()` goes on."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        self.conversations = build_conversations(cfg)
        self.stats = LiveStats()
        self.records: list[RequestRecord] = []
        self._by_tenant: list[list[Conversation]] = [[] for _ in range(cfg.tenants)]
        for conv in self.conversations:
            self._by_tenant[conv.tenant].append(conv)
        self._choice_rng = random.Random(f"{cfg.seed}:choice")
        self._spread_rng = random.Random(f"{cfg.seed}:spread")
        self._cumulative: list[float] | None = None
        if cfg.zipf_exponent is not None:
            self._cumulative = list(itertools.accumulate(cfg.popularity()))
        self._turn = 0
        self._t0 = 0.0

    # -- choices ------------------------------------------------------------------------------

    def pick(self) -> Conversation | None:
        """A uniformly chosen tenant's idle conversation; another tenant's if all are busy.

        With a Zipf popularity the tenant is drawn by its weight, and a tenant whose
        conversations are all busy opens a new one: its load does not leak to others.
        """
        if self._cumulative is not None:
            return self._pick_weighted(self._cumulative)
        tenant = self._choice_rng.randrange(self.cfg.tenants)
        idle = [c for c in self._by_tenant[tenant] if not c.busy]
        if not idle:
            idle = [c for c in self.conversations if not c.busy]
            if not idle:
                return None
        return self._choice_rng.choice(idle)

    def _pick_weighted(self, cumulative: list[float]) -> Conversation:
        draw = self._choice_rng.random() * cumulative[-1]
        tenant = min(bisect.bisect_right(cumulative, draw), self.cfg.tenants - 1)
        own = self._by_tenant[tenant]
        idle = [c for c in own if not c.busy]
        if idle:
            return self._choice_rng.choice(idle)
        # Every tenant starts with at least one conversation: its system prompt is there.
        model = self.cfg.models[(tenant + len(own)) % len(self.cfg.models)]
        conv = Conversation(tenant, len(own), model, own[0].system)
        own.append(conv)
        self.conversations.append(conv)
        self.stats.opened += 1
        return conv

    def target(self) -> int:
        n = len(self.cfg.base_urls)
        if self.cfg.spread == "random":
            return self._spread_rng.randrange(n)
        index = self._turn % n
        self._turn += 1
        return index

    # -- one request --------------------------------------------------------------------------

    async def _one(self, session: aiohttp.ClientSession, conv: Conversation) -> None:
        cfg = self.cfg
        seq = self.stats.sent
        self.stats.sent += 1
        self.stats.inflight += 1
        conv.busy = True
        turn = conv.turns + 1
        text = user_message(cfg.seed, conv.tenant, conv.name, turn, cfg.user_tokens)
        messages = conv.ask(text)
        target = self.target()
        start_s = time.monotonic() - self._t0
        record = RequestRecord(
            seq,
            conv.tenant,
            conv.name,
            turn,
            conv.model,
            target,
            start_s,
            warmup=start_s < cfg.warmup_s,
        )
        body: dict[str, Any] = {
            "model": conv.model,
            "messages": messages,
            "max_tokens": cfg.max_tokens,
            "stream": cfg.stream,
        }
        if cfg.stream:
            body["stream_options"] = {"include_usage": True}
        headers = {
            "Authorization": f"Bearer {cfg.api_keys[conv.tenant % len(cfg.api_keys)]}",
            "x-request-id": f"wl-{cfg.seed}-{seq}",
        }
        if cfg.conversation_key == "prompt_cache_key":
            body["prompt_cache_key"] = conv.name
        elif cfg.conversation_key == "x-session-id":
            headers["x-session-id"] = conv.name
        url = cfg.base_urls[target].rstrip("/") + CHAT_PATH
        reply = ""
        start = time.monotonic()
        try:
            async with asyncio.timeout(cfg.request_timeout_s):
                reply = await self._send(session, url, body, headers, record, start)
        except TimeoutError:
            record.error = f"timeout after {cfg.request_timeout_s:.0f}s"
        except aiohttp.ClientError as exc:
            record.error = f"{type(exc).__name__}: {str(exc)[:160]}"
        except ValueError as exc:  # an answer that is not the JSON it should be
            record.error = f"bad answer: {type(exc).__name__}: {str(exc)[:160]}"
        except asyncio.CancelledError:  # the run is being stopped: no reply to append
            record.error = "cancelled"
            raise
        finally:
            record.latency_s = time.monotonic() - start
            if record.error is None:
                conv.answered(reply, cfg.max_turns)
            else:
                conv.failed()
                self.stats.errors += 1
            conv.busy = False
            self.stats.inflight -= 1
            self.stats.done += 1
            self.records.append(record)

    async def _send(
        self,
        session: aiohttp.ClientSession,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        record: RequestRecord,
        start: float,
    ) -> str:
        """Sends one request, fills `record` in; returns the assistant's text."""
        async with session.post(url, json=body, headers=headers) as resp:
            record.status = resp.status
            record.backend_id = resp.headers.get("x-backend-id")
            record.affinity = resp.headers.get("x-affinity")
            record.node_id = resp.headers.get("x-affinity-node")
            if resp.status != 200:
                raw = await resp.content.read(4096)
                record.error = f"HTTP {resp.status}: {error_message(raw)}"
                return ""
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                data = _object(await resp.json(content_type=None))
                record.ttft_s = time.monotonic() - start
                _usage(record, data.get("usage"))
                choices = data.get("choices") or [{}]
                message = _object(_object(choices[0]).get("message") or {})
                return str(message.get("content") or "")
            parts: list[str] = []
            done = False
            async for raw_line in resp.content:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = _object(json.loads(payload))
                if "error" in event:
                    record.error = f"stream error: {error_message(payload)}"
                    return ""
                _usage(record, event.get("usage"))
                for choice in event.get("choices") or ():
                    piece = _object(_object(choice).get("delta") or {}).get("content")
                    if isinstance(piece, str) and piece:
                        if record.ttft_s is None:
                            record.ttft_s = time.monotonic() - start
                        parts.append(piece)
            if not done:
                record.error = "stream ended without [DONE]"
            return "".join(parts)

    # -- the run ------------------------------------------------------------------------------

    async def run(
        self,
        progress: ProgressCallback | None = None,
        progress_interval_s: float = 1.0,
        session: aiohttp.ClientSession | None = None,
        on_measure: Callable[[], Awaitable[None]] | None = None,
    ) -> WorkloadResult:
        """Runs the load; `on_measure` is awaited when the warm-up ends (e.g. to read the
        counters the measured part starts from), concurrently with the load."""
        cfg = self.cfg
        async with contextlib.AsyncExitStack() as stack:
            if session is None:
                connector = aiohttp.TCPConnector(limit=cfg.max_inflight, force_close=False)
                session = await stack.enter_async_context(
                    aiohttp.ClientSession(
                        connector=connector,
                        timeout=aiohttp.ClientTimeout(
                            total=None, sock_connect=10, sock_read=cfg.request_timeout_s
                        ),
                    )
                )
            self._t0 = time.monotonic()
            ticker = None
            if progress is not None:
                ticker = asyncio.create_task(self._tick(progress, progress_interval_s))
            boundary = None
            if on_measure is not None:
                boundary = asyncio.create_task(self._at_boundary(on_measure))
            try:
                if cfg.rate is not None:
                    await self._open_loop(session, cfg.rate)
                else:
                    assert cfg.concurrency is not None
                    await self._closed_loop(session, cfg.concurrency)
                if boundary is not None:
                    await boundary
            finally:
                for task in (ticker, boundary):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            self.stats.elapsed_s = time.monotonic() - self._t0
        self.records.sort(key=lambda r: r.seq)
        return WorkloadResult(self.records, self.stats.elapsed_s, self.stats.skipped, cfg.warmup_s)

    async def _at_boundary(self, hook: Callable[[], Awaitable[None]]) -> None:
        delay = self._t0 + self.cfg.warmup_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await hook()

    async def _tick(self, progress: ProgressCallback, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.stats.elapsed_s = time.monotonic() - self._t0
            progress(self.stats)

    async def _open_loop(self, session: aiohttp.ClientSession, rate: float) -> None:
        cfg = self.cfg
        tasks: set[asyncio.Task[None]] = set()
        try:
            span = cfg.warmup_s + cfg.duration_s
            for offset in arrival_times(rate, span, cfg.max_requests, cfg.seed):
                delay = self._t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival schedule itself
                conv = self.pick() if len(tasks) < cfg.max_inflight else None
                if conv is None:
                    self.stats.skipped += 1
                    continue
                task = asyncio.create_task(self._one(session, conv))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _closed_loop(self, session: aiohttp.ClientSession, concurrency: int) -> None:
        cfg = self.cfg
        deadline = self._t0 + cfg.warmup_s + cfg.duration_s
        # One conversation per worker at most: more workers than conversations would wait.
        workers = min(concurrency, len(self.conversations))

        async def worker() -> None:
            while time.monotonic() < deadline and self.stats.sent < cfg.max_requests:
                conv = self.pick()
                if conv is None:  # pragma: no cover - workers <= conversations
                    return
                await self._one(session, conv)

        async with asyncio.TaskGroup() as group:
            for _ in range(workers):
                group.create_task(worker())


def _object(value: Any) -> dict[str, Any]:
    """A JSON object from the server, or ValueError (recorded as a bad answer)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _usage(record: RequestRecord, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    prompt = usage.get("prompt_tokens")
    if isinstance(prompt, int):
        record.prompt_tokens = prompt
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]


def error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        message = body["error"]["message"]
        if isinstance(message, str):
            return message[:200]
    except (ValueError, KeyError, TypeError):
        pass
    return raw[:200].decode(errors="replace")
