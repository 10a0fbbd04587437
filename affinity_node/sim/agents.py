"""Coding-agent sessions on the Responses API: the workload of `demo --scenario agents`.

An agent session is a chain of turns on `POST /v1/responses`. Each turn sends only what is
new (the user's message, or the output of the tool the model called) with
`previous_response_id` naming the last answer: the conversation lives on the server that
stored it, which puts it before the new input, so the context grows turn by turn while the
client sends a few dozen tokens. Every turn carries the tenant's long `instructions` and
declares its tools; a user message that says "call tool" is answered with a function call
(the simulator's rule, sim/responses_api.py), and the next turn sends a
`function_call_output` for it. After `turns_per_chain` answered turns the session starts a
new chain (a new task, fresh context).

A stored response exists only on the backend that made it (vLLM keeps them in memory), so a
follow-up that lands elsewhere gets 404: a chain failure, counted as an error. The client
then does what an agent client does to recover: it resends the whole conversation it holds
locally (every item sent and received in the chain) without `previous_response_id`, which
starts a new chain on whichever backend gets it, and goes on from that answer.

Sessions run closed-loop (one turn in flight each, a short pause between turns standing for
the tool's or the user's time), spread over tenants by a Zipf law so that one tenant keeps a
backend busy. Turns go round-robin over the base URLs, so consecutive turns of a chain
usually reach different nodes (or, with the backends as base URLs, different backends).
Everything random is seeded; records carry the tenant index, never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from affinity_node.sim.prefix_cache import BLOCK_SIZE
from affinity_node.sim.responses_api import TOOL_TRIGGER
from affinity_node.sim.workload import (
    ROLE_TOKENS,
    LiveStats,
    RequestRecord,
    WorkloadResult,
    error_message,
    filler_text,
    system_prompt,
    zipf_weights,
)

RESPONSES_PATH: Final = "/v1/responses"
TOOLS: Final = (
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file of the repository.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    },
    {
        "type": "function",
        "name": "run_tests",
        "description": "Run the test suite and return its output.",
        "parameters": {"type": "object", "properties": {}},
    },
)
_FIRST_TOKEN_EVENTS: Final = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta"}
)


@dataclass(frozen=True)
class AgentsConfig:
    """What the agents send, where, and for how long. Times in seconds."""

    base_urls: tuple[str, ...]
    api_keys: tuple[str, ...] = field(repr=False)
    """Secrets; tenant i uses api_keys[i % len]."""
    model: str = "llama-3.1-8b"
    tenants: int = 4
    sessions_per_tenant: int = 5
    """On average: `tenants * sessions_per_tenant` sessions are shared out by popularity."""
    zipf_exponent: float = 1.5
    turns_per_chain: int = 8
    instructions_tokens: tuple[int, int] = (1000, 1400)
    user_tokens: tuple[int, int] = (20, 60)
    tool_output_tokens: tuple[int, int] = (150, 400)
    tool_share: float = 0.4
    """Share of user messages that ask for a tool (each adds a function_call_output turn)."""
    max_output_tokens: int = 32
    think_s: float = 0.2
    """Mean pause between a session's turns (exponential): the tool's or the user's time."""
    duration_s: float = 20.0
    warmup_s: float = 0.0
    seed: int = 1
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.base_urls or not self.api_keys:
            raise ValueError("at least one base URL and one API key are needed")
        if self.tenants < 1 or self.sessions_per_tenant < 1 or self.turns_per_chain < 1:
            raise ValueError("tenants, sessions_per_tenant and turns_per_chain must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.think_s < 0:
            raise ValueError("duration_s must be > 0, warmup_s and think_s >= 0")
        if not 0 <= self.tool_share <= 1 or self.zipf_exponent < 0:
            raise ValueError("tool_share must be in [0, 1] and zipf_exponent >= 0")

    def session_counts(self) -> list[int]:
        """Sessions of each tenant (at least one each), by Zipf popularity."""
        total = self.tenants * self.sessions_per_tenant
        return [max(1, round(total * p)) for p in zipf_weights(self.tenants, self.zipf_exponent)]

    def tokens_per_turn(self) -> float:
        """Mean tokens a turn adds to its chain's context (its input and its answer)."""
        user = sum(self.user_tokens) / 2 + ROLE_TOKENS
        tool = sum(self.tool_output_tokens) / 2 + 2 * ROLE_TOKENS
        answer = self.max_output_tokens + ROLE_TOKENS
        p = self.tool_share
        return (user + answer + p * (tool + answer)) / (1 + p)


def live_context_blocks(cfg: AgentsConfig) -> int:
    """Prefix blocks of every session's chain at its longest, plus each tenant's
    instructions once: what the fleet's caches must hold for no chain to lose its context."""
    rng = random.Random(f"{cfg.seed}:instructions")
    instructions = sum(rng.randint(*cfg.instructions_tokens) for _ in range(cfg.tenants))
    chain = cfg.turns_per_chain * cfg.tokens_per_turn()
    return round((instructions + sum(cfg.session_counts()) * chain) / BLOCK_SIZE)


@dataclass
class AgentRecord(RequestRecord):
    chain_failure: bool = False
    """A 404 for a request naming `previous_response_id`: the chain was lost."""
    resend: bool = False
    """The whole conversation resent after a chain failure."""


@dataclass
class Session:
    """One agent: its chain so far (the items it would resend), and what it sends next."""

    tenant: int
    slot: int
    instructions: str
    rng: random.Random
    chain: int = 0
    turns: int = 0
    previous_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] | None = None
    """This turn's input, kept until it is answered (a failed turn is sent again)."""
    call: dict[str, Any] | None = None
    """The function call of the last answer, to be answered by the next turn."""

    @property
    def name(self) -> str:
        return f"t{self.tenant}/s{self.slot}/c{self.chain}"

    def next_input(self, cfg: AgentsConfig) -> list[dict[str, Any]]:
        if self.pending is None:
            self.pending = [self._tool_output(cfg) if self.call else self._user_message(cfg)]
        return self.pending

    def _user_message(self, cfg: AgentsConfig) -> dict[str, Any]:
        text = f"Turn {self.turns + 1} : " + filler_text(
            self.rng, self.rng.randint(*cfg.user_tokens)
        )
        if self.rng.random() < cfg.tool_share:
            text += f" Please {TOOL_TRIGGER} to look first ."
        return {"type": "message", "role": "user", "content": text}

    def _tool_output(self, cfg: AgentsConfig) -> dict[str, Any]:
        assert self.call is not None
        output = filler_text(self.rng, self.rng.randint(*cfg.tool_output_tokens))
        return {"type": "function_call_output", "call_id": self.call["call_id"], "output": output}

    def answered(self, response_id: str, output: list[dict[str, Any]], cfg: AgentsConfig) -> None:
        assert self.pending is not None
        self.history += self.pending + output
        self.pending = None
        self.previous_id = response_id
        self.turns += 1
        self.call = next((o for o in output if o.get("type") == "function_call"), None)
        if self.turns >= cfg.turns_per_chain and self.call is None:
            self.chain += 1
            self.turns = 0
            self.previous_id = None
            self.history = []


def build_sessions(cfg: AgentsConfig) -> list[Session]:
    rng = random.Random(f"{cfg.seed}:instructions")
    sessions = []
    for tenant, count in enumerate(cfg.session_counts()):
        tokens = rng.randint(*cfg.instructions_tokens)
        instructions = "You are a coding agent . " + system_prompt(cfg.seed, tenant, tokens)
        for slot in range(count):
            session_rng = random.Random(f"{cfg.seed}:agent:{tenant}:{slot}")
            sessions.append(Session(tenant, slot, instructions, session_rng))
    return sessions


def chain_failures(records: Sequence[RequestRecord]) -> int:
    return sum(1 for r in records if isinstance(r, AgentRecord) and r.chain_failure)


class AgentsWorkload:
    """Runs the sessions; `stats` is live while `run()` goes on."""

    def __init__(self, cfg: AgentsConfig) -> None:
        self.cfg = cfg
        self.sessions = build_sessions(cfg)
        self.stats = LiveStats()
        self.records: list[RequestRecord] = []
        self._next_target = 0
        self._t0 = 0.0

    def _target(self) -> int:
        index = self._next_target % len(self.cfg.base_urls)
        self._next_target += 1
        return index

    # -- one turn ------------------------------------------------------------------------------

    def _body(self, session: Session, items: list[dict[str, Any]], chained: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "input": items,
            "instructions": session.instructions,
            "tools": list(TOOLS),
            "stream": True,
            "store": True,
            "max_output_tokens": self.cfg.max_output_tokens,
            "prompt_cache_key": session.name,
        }
        if chained and session.previous_id is not None:
            body["previous_response_id"] = session.previous_id
        return body

    async def _turn(self, http: aiohttp.ClientSession, session: Session) -> None:
        items = session.next_input(self.cfg)
        record = await self._request(http, session, self._body(session, items, chained=True))
        if record.chain_failure:
            # The stored chain is out of reach: resend everything, a new chain from here.
            body = self._body(session, session.history + items, chained=False)
            await self._request(http, session, body, resend=True)

    async def _request(
        self,
        http: aiohttp.ClientSession,
        session: Session,
        body: dict[str, Any],
        resend: bool = False,
    ) -> AgentRecord:
        cfg = self.cfg
        seq = self.stats.sent
        self.stats.sent += 1
        self.stats.inflight += 1
        target = self._target()
        start_s = time.monotonic() - self._t0
        record = AgentRecord(
            seq, session.tenant, session.name, session.turns + 1, cfg.model, target, start_s,
            warmup=start_s < cfg.warmup_s, resend=resend,
        )  # fmt: skip
        headers = {
            "Authorization": f"Bearer {cfg.api_keys[session.tenant % len(cfg.api_keys)]}",
            "x-request-id": f"agents-{cfg.seed}-{seq}",
        }
        url = cfg.base_urls[target].rstrip("/") + RESPONSES_PATH
        start = time.monotonic()
        final: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(cfg.request_timeout_s):
                final = await self._send(http, url, body, headers, record, start)
        except TimeoutError:
            record.error = f"timeout after {cfg.request_timeout_s:.0f}s"
        except aiohttp.ClientError as exc:
            record.error = f"{type(exc).__name__}: {str(exc)[:160]}"
        except (ValueError, KeyError, TypeError) as exc:  # not the answer it should be
            record.error = f"bad answer: {type(exc).__name__}: {str(exc)[:160]}"
        finally:
            record.latency_s = time.monotonic() - start
            if final is not None and record.error is None:
                session.answered(str(final["id"]), list(final["output"]), cfg)
            elif record.error is None:
                record.error = "stream ended without response.completed"
            if record.error is not None:
                self.stats.errors += 1
            self.stats.inflight -= 1
            self.stats.done += 1
            self.records.append(record)
        return record

    async def _send(
        self,
        http: aiohttp.ClientSession,
        url: str,
        body: dict[str, Any],
        headers: dict[str, str],
        record: AgentRecord,
        start: float,
    ) -> dict[str, Any] | None:
        """One request; fills `record` in; returns the completed response, or None."""
        async with http.post(url, json=body, headers=headers) as resp:
            record.status = resp.status
            record.backend_id = resp.headers.get("x-backend-id")
            record.affinity = resp.headers.get("x-affinity")
            record.node_id = resp.headers.get("x-affinity-node")
            if resp.status != 200:
                raw = await resp.content.read(4096)
                record.chain_failure = resp.status == 404 and "previous_response_id" in body
                prefix = "chain failure: " if record.chain_failure else ""
                record.error = f"{prefix}HTTP {resp.status}: {error_message(raw)}"
                return None
            async for raw_line in resp.content:
                line = raw_line.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                kind = event.get("type") if isinstance(event, dict) else None
                if kind in _FIRST_TOKEN_EVENTS and record.ttft_s is None:
                    record.ttft_s = time.monotonic() - start
                elif kind == "response.completed":
                    return _completed(record, event["response"])
                elif kind in ("error", "response.failed"):
                    record.error = f"stream error: {json.dumps(event)[:200]}"
                    return None
            return None

    # -- the run -------------------------------------------------------------------------------

    async def run(
        self,
        progress: Callable[[LiveStats], None] | None = None,
        on_measure: Callable[[], Awaitable[None]] | None = None,
    ) -> WorkloadResult:
        """Runs every session until the warm-up and the measured part are over (turns in
        flight then finish); `on_measure` is awaited when the warm-up ends."""
        cfg = self.cfg
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=cfg.request_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self._t0 = time.monotonic()
            deadline = self._t0 + cfg.warmup_s + cfg.duration_s
            ticker = None if progress is None else asyncio.create_task(self._tick(progress))
            boundary = None
            if on_measure is not None:
                boundary = asyncio.create_task(self._at_boundary(on_measure))
            try:
                async with asyncio.TaskGroup() as group:
                    for session in self.sessions:
                        group.create_task(self._session(http, session, deadline))
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
        return WorkloadResult(self.records, self.stats.elapsed_s, 0, cfg.warmup_s)

    async def _session(
        self, http: aiohttp.ClientSession, session: Session, deadline: float
    ) -> None:
        think = random.Random(f"{self.cfg.seed}:think:{session.tenant}:{session.slot}")
        # Sessions start spread over one mean pause, not all at once.
        await asyncio.sleep(think.uniform(0, self.cfg.think_s))
        while time.monotonic() < deadline:
            await self._turn(http, session)
            if self.cfg.think_s > 0:
                await asyncio.sleep(think.expovariate(1 / self.cfg.think_s))  # the agent's pace

    async def _at_boundary(self, hook: Callable[[], Awaitable[None]]) -> None:
        delay = self._t0 + self.cfg.warmup_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await hook()

    async def _tick(self, progress: Callable[[LiveStats], None]) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.stats.elapsed_s = time.monotonic() - self._t0
            progress(self.stats)


def _completed(record: AgentRecord, response: dict[str, Any]) -> dict[str, Any]:
    usage = response.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("input_tokens"), int):
            record.prompt_tokens = usage["input_tokens"]
        details = usage.get("input_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            record.cached_tokens = details["cached_tokens"]
    if not isinstance(response.get("id"), str) or not isinstance(response.get("output"), list):
        raise ValueError("response.completed without an id and an output list")
    return response
