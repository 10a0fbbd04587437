"""Real llama.cpp servers (each in its own child process, one thread) behind real proxy
nodes sharing one Postgres; clients use the official openai SDK.

The engines run the tiny random-weight model (sim/llamacpp.py): what they report about their
prefix cache (`usage.prompt_tokens_details.cached_tokens`, `timings`, `/metrics`) is their
own measurement, never ours. Engines start fresh for each fleet: llama.cpp keeps prompt
caches in host RAM beyond its slots, so one test's prompts must not meet another's.
"""

from __future__ import annotations

import signal
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import openai

from affinity_node.app import RunningNode, run_node
from affinity_node.config import (
    AffinityConfig,
    BackendConfig,
    DatabaseConfig,
    DiscoveryConfig,
    HealthConfig,
    LedgerConfig,
    ListenConfig,
    LoadConfig,
    ModelConfig,
    NodeConfig,
    RoutingConfig,
    validate,
)
from affinity_node.sim.llamacpp import MODEL_NAME, EngineProcess, start_servers
from affinity_node.sim.support import Processes, free_port, parse_metrics, total
from tests.support.cluster import key_everywhere

MODEL = MODEL_NAME


@dataclass
class LlamaFleet:
    dsn: str
    engines: list[EngineProcess]
    nodes: list[RunningNode]
    processes: Processes
    stack: AsyncExitStack
    key_ids: dict[str, uuid.UUID] = field(default_factory=dict)

    async def new_key(self, name: str) -> str:
        key_id, secret = await key_everywhere(self.dsn, self.nodes, name)
        self.key_ids[name] = key_id
        return secret

    def client(self, node: int, secret: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=f"{self.nodes[node].url}/v1", api_key=secret, max_retries=0, timeout=30.0
        )
        self.stack.push_async_callback(client.close)
        return client

    async def bound_to(self, name: str) -> str | None:
        """The backend URL the database binds the key `name` to (None: unbound)."""
        conn = await asyncpg.connect(self.dsn)
        try:
            url: str | None = await conn.fetchval(
                "SELECT provider_url FROM api_key_model_affinity WHERE api_key_id = $1",
                self.key_ids[name],
            )
            return url
        finally:
            await conn.close()

    def engine_at(self, url: str) -> EngineProcess:
        return next(e for e in self.engines if e.url == url.rstrip("/"))

    def kill(self, engine: EngineProcess) -> None:
        """A real crash: SIGKILL, no goodbye on its sockets beyond what the kernel sends."""
        Processes.signal(engine.child, signal.SIGKILL)

    async def engine_counts(self, engine: EngineProcess) -> tuple[float, float]:
        """(prompt tokens the engine computed, prompt tokens it found cached), from its own
        /metrics (`llamacpp:prompt_tokens_total`, `llamacpp:prompt_tokens_cached_total`)."""
        async with aiohttp.ClientSession() as http, http.get(f"{engine.url}/metrics") as resp:
            samples = parse_metrics(await resp.text())
        return (
            total(samples, "llamacpp:prompt_tokens_total"),
            total(samples, "llamacpp:prompt_tokens_cached_total"),
        )


def node_config(
    dsn: str, engines: list[EngineProcess], node_id: str, fallback: str, quiet: bool
) -> NodeConfig:
    """`quiet`: health checks, load polls and discovery once a minute, so that nothing but
    the requests of the test talks to the engines (idle connections stay idle)."""
    every = 60.0 if quiet else None
    cfg = NodeConfig(
        node_id=node_id,
        listen=ListenConfig(host="127.0.0.1", port=0),
        database=DatabaseConfig(
            dsn=dsn, pool_max=5, statement_timeout_ms=1000, lock_timeout_ms=500
        ),
        # One tenant, one backend: no fan-out, so "which engine" is the binding alone.
        affinity=AffinityConfig(max_fanout=1),
        routing=RoutingConfig(fallback=fallback),  # type: ignore[arg-type]
        health=HealthConfig(
            interval_seconds=every or 0.2, eject_after_failures=2, readmit_after_successes=2
        ),
        load=LoadConfig(poll_interval_seconds=every or 1.0),
        discovery=DiscoveryConfig(interval_seconds=every or 10.0),
        ledger=LedgerConfig(flush_interval_seconds=0.1),
        backends=[BackendConfig(url=e.url, models=[MODEL], kind="llamacpp") for e in engines],
        models=[ModelConfig(name=MODEL)],
    )
    validate(cfg)
    return cfg


@asynccontextmanager
async def llama_fleet(
    dsn: str,
    model: Path,
    engines: int = 3,
    nodes: int = 3,
    fallback: str = "round_robin",
    quiet: bool = False,
) -> AsyncIterator[LlamaFleet]:
    """`engines` fresh llama.cpp servers and `nodes` proxy nodes in this process. The default
    fallback (round robin, per node) spreads new tenants of one node over the engines in turn,
    so a test can put two tenants on different engines without guessing."""
    async with AsyncExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llamacpp-")))
        processes = Processes(logs)
        stack.push_async_callback(processes.close)
        started = await start_servers(processes, model, [free_port() for _ in range(engines)])
        configs = [node_config(dsn, started, f"node-{i}", fallback, quiet) for i in range(nodes)]
        running = [await stack.enter_async_context(run_node(cfg)) for cfg in configs]
        yield LlamaFleet(dsn, started, running, processes, stack)
