"""A real cluster in one process: fake vLLM backends and proxy nodes on loopback ports,
sharing one Postgres. Clients talk to it with the official openai SDK."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
import openai

from affinity_node.app import RunningNode, run_node
from affinity_node.auth.keycache import InvalidKey, KeysUnavailable
from affinity_node.config import (
    AffinityConfig,
    BackendConfig,
    DatabaseConfig,
    HealthConfig,
    ListenConfig,
    ModelConfig,
    NodeConfig,
    validate,
)
from affinity_node.sim.fake_backend import FakeBackendConfig, RunningFakeBackend, serve
from affinity_node.store.keys import create_key
from tests.support.waiting import wait_for

MODEL = "llama-3.1-8b"
ALIAS = "meta-llama/Llama-3.1-8B-Instruct"


@dataclass
class Cluster:
    dsn: str
    nodes: list[RunningNode]
    backends: list[RunningFakeBackend]
    stack: AsyncExitStack
    secrets: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, uuid.UUID] = field(default_factory=dict)

    async def new_key(self, name: str) -> str:
        key_id, secret = await key_everywhere(self.dsn, self.nodes, name)
        self.secrets[name] = secret
        self.key_ids[name] = key_id
        return secret

    def client(self, node: int, secret: str, **kw: Any) -> openai.AsyncOpenAI:
        """Closed when the cluster stops (before the event loop does)."""
        client = openai.AsyncOpenAI(
            base_url=f"{self.nodes[node].url}/v1",
            api_key=secret,
            max_retries=0,
            timeout=kw.pop("timeout", 30.0),
            **kw,
        )
        self.stack.push_async_callback(client.close)
        return client

    def backend_by_url(self, url: str) -> RunningFakeBackend:
        for b in self.backends:
            if url.rstrip("/").endswith(f":{b.port}"):
                return b
        raise KeyError(url)


async def key_everywhere(dsn: str, nodes: list[RunningNode], name: str) -> tuple[uuid.UUID, str]:
    """A new key, once every node knows it: a key works on a node when its notification has
    arrived (milliseconds); until then an in-sync node refuses unknown tokens from memory."""
    conn = await asyncpg.connect(dsn)
    try:
        key, secret = await create_key(conn, name)
    finally:
        await conn.close()
    for node in nodes:
        await wait_for(partial(knows, node, secret), timeout=5.0, what="the key everywhere")
    return key.id, secret


async def knows(node: RunningNode, secret: str) -> bool:
    try:
        await node.keys.authenticate(secret)
    except (InvalidKey, KeysUnavailable):
        return False
    return True


def node_config(
    dsn: str, backends: list[RunningFakeBackend], node_id: str, **affinity: Any
) -> NodeConfig:
    cfg = NodeConfig(
        node_id=node_id,
        listen=ListenConfig(host="127.0.0.1", port=0),
        database=DatabaseConfig(
            dsn=dsn, pool_max=5, statement_timeout_ms=1000, lock_timeout_ms=500
        ),
        affinity=AffinityConfig(**affinity),
        health=HealthConfig(
            interval_seconds=0.2, eject_after_failures=2, readmit_after_successes=2
        ),
        backends=[BackendConfig(url=b.url, models=[MODEL]) for b in backends],
        models=[ModelConfig(name=MODEL, aliases=[ALIAS])],
    )
    validate(cfg)
    return cfg


@asynccontextmanager
async def cluster(
    dsn: str,
    nodes: int = 2,
    backends: int = 3,
    backend_cfg: dict[str, Any] | None = None,
    node_dsn: str | None = None,
    configure: Callable[[NodeConfig], None] | None = None,
    **affinity: Any,
) -> AsyncIterator[Cluster]:
    """`node_dsn` lets the nodes reach Postgres another way (through a FaultProxy);
    `configure` adjusts each node's config (timeouts, health) before it starts."""
    async with AsyncExitStack() as stack:
        fakes = []
        for i in range(backends):
            fake = await serve(
                FakeBackendConfig(backend_id=f"b{i}", models=[MODEL], **(backend_cfg or {}))
            )
            stack.push_async_callback(fake.close)
            fakes.append(fake)
        configs = [
            node_config(node_dsn or dsn, fakes, f"node-{i}", **affinity) for i in range(nodes)
        ]
        for cfg in configs:
            if configure is not None:
                configure(cfg)
            validate(cfg)
        running = [await stack.enter_async_context(run_node(cfg)) for cfg in configs]
        yield Cluster(dsn, running, fakes, stack)
