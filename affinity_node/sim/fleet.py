"""The demo's fleet on one machine: fake backends, proxy nodes (restarted per scenario) and
HAProxy in front when there is one; keys for its tenants."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from affinity_node.sim.capacity import CapacityModel
from affinity_node.sim.haproxy import haproxy_config, haproxy_servers_up
from affinity_node.sim.llamacpp import EngineProcess, start_server
from affinity_node.sim.support import (
    Child,
    Processes,
    SupportError,
    free_port,
    poll,
    scrape_all,
    wait_http_ok,
)

MODEL = "llama-3.1-8b"


@dataclass(frozen=True)
class Scenario:
    """One column of the report: a name and the `affinity:` section its nodes run with."""

    key: str
    title: str
    affinity: dict[str, Any] = field(default_factory=dict)
    configured_backends: int | None = None
    """How many of the fleet's backends the nodes' config lists, as a slice bound (None: all,
    -1: all but the last); the others can join at runtime (`backends add`)."""
    sections: dict[str, Any] = field(default_factory=dict)
    """More config sections for the nodes (e.g. rebalance and drain pacing)."""
    direct: bool = False
    """No node: the load goes round-robin straight to the backends, as a plain load
    balancer in front of vLLM sends it (the agents scenario's baseline)."""


@dataclass(frozen=True)
class BackendModel:
    """The fake backends' capacity flags (one simulated GPU each; see sim/capacity.py)."""

    prefill_s_per_token: float
    ttft_base_s: float
    tokens_per_s: float
    decode_slowdown: float
    max_running: int

    def capacity(self, cache_blocks: int) -> CapacityModel:
        """The engine's model of a backend started with these flags (KV pool = cache)."""
        return CapacityModel(
            max_running=self.max_running,
            prefill_s_per_token=self.prefill_s_per_token,
            ttft_base_s=self.ttft_base_s,
            decode_tokens_per_s=self.tokens_per_s,
            decode_slowdown=self.decode_slowdown,
            kv_cache_blocks=max(cache_blocks, 1),
        )


@dataclass
class Fleet:
    """Ports and processes of one demo; nodes are restarted per scenario."""

    procs: Processes
    session: aiohttp.ClientSession
    tmp: Path
    dsn: str
    backend_ports: list[int]
    node_ports: list[int]
    lb_url: str | None = None
    stats_url: str | None = None
    nodes: list[Child] | None = None
    node_log_level: str = "WARNING"
    engine_model: Path | None = None
    """The GGUF file when the backends are real llama.cpp servers (`demo --engine llamacpp`)."""
    engines: list[EngineProcess] = field(default_factory=list)
    engine_cache_mib: int = -1
    """llama.cpp's host-RAM prompt cache per engine (-1: its default, several GiB)."""

    @property
    def backend_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.backend_ports]

    @property
    def backend_kind(self) -> str:
        return "vllm" if self.engine_model is None else "llamacpp"

    @property
    def node_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.node_ports]

    @property
    def backend_ids(self) -> list[str]:
        return [f"b{i}" for i in range(len(self.backend_ports))]

    async def start_backends(
        self,
        cache_blocks: int,
        model: BackendModel,
        output_tokens: int,
        seed: int,
        kv_blocks: int | None = None,
    ) -> None:
        """`kv_blocks`: the running requests' KV pool (default: as large as the cache)."""
        kv = [] if kv_blocks is None else ["--kv-cache-blocks", str(kv_blocks)]
        children = []
        for i, port in enumerate(self.backend_ports):
            children.append(
                await self.procs.start(
                    f"backend-b{i}",
                    [
                        sys.executable,
                        "-m",
                        "affinity_node",
                        "fake-backend",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--id",
                        f"b{i}",
                        "--model",
                        MODEL,
                        "--cache-blocks",
                        str(cache_blocks),
                        "--ttft-base",
                        str(model.ttft_base_s),
                        "--prefill-per-token",
                        str(model.prefill_s_per_token),
                        "--tokens-per-s",
                        str(model.tokens_per_s),
                        "--decode-slowdown",
                        str(model.decode_slowdown),
                        "--output-tokens",
                        str(output_tokens),
                        "--max-running",
                        str(model.max_running),
                        "--seed",
                        str(seed + i),
                        *kv,
                    ],
                )
            )
        await asyncio.gather(
            *(
                wait_http_ok(self.session, f"{url}/health", child, f"{child.name} to serve")
                for url, child in zip(self.backend_urls, children, strict=True)
            )
        )

    async def start_llamacpp(self, model: Path, cache_ram_mib: int | None = None) -> None:
        """Real llama.cpp servers on the backend ports, one thread each (sim/llamacpp.py);
        `cache_ram_mib`: their prompt cache beyond the slot (None: as before, -1: theirs)."""
        self.engine_model = model
        if cache_ram_mib is not None:
            self.engine_cache_mib = cache_ram_mib
        self.engines = list(
            await asyncio.gather(
                *(
                    start_server(
                        self.procs,
                        self.session,
                        f"backend-b{i}",
                        model,
                        port,
                        cache_ram_mib=self.engine_cache_mib,
                        backend_id=f"b{i}",
                    )
                    for i, port in enumerate(self.backend_ports)
                )
            )
        )

    async def _restart_llamacpp(self) -> None:
        """Fresh instances: llama.cpp keeps prompts in host RAM beyond its slots, and no
        endpoint clears both."""
        assert self.engine_model is not None
        await self.procs.stop([e.child for e in self.engines])
        await self.start_llamacpp(self.engine_model)

    async def start_haproxy(self, binary: str, balance: str) -> None:
        port, stats_port = free_port(), free_port()
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, stats_port, self.node_ports, balance))
        check = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            "-q",
            "-f",
            str(cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, _ = await check.communicate()
        if check.returncode != 0:
            raise SupportError(f"haproxy rejected the generated config:\n{out.decode()}")
        self.lb_url = f"http://127.0.0.1:{port}"
        self.stats_url = f"http://127.0.0.1:{stats_port}/stats"
        child = await self.procs.start("haproxy", [binary, "-db", "-f", str(cfg)])
        await wait_http_ok(self.session, self.stats_url, child, "haproxy to listen")

    def _node_config(self, i: int, scenario: Scenario) -> Path:
        cfg = {
            "node_id": f"demo-node-{i}",
            "listen": {"host": "127.0.0.1", "port": self.node_ports[i]},
            "database": {"dsn": self.dsn, "pool_max": 4, "statement_timeout_ms": 2000},
            "affinity": {"ttl_seconds": 900, **scenario.affinity},
            "routing": {"fallback": "least_outstanding"},
            "health": {"interval_seconds": 1.0},
            "limits": {"drain_timeout_seconds": 5},
            "logging": {"level": self.node_log_level, "json": False},
            "backends": [
                {"url": u, "models": [MODEL], "kind": self.backend_kind}
                for u in self.backend_urls[: scenario.configured_backends]
            ],
            "models": [{"name": MODEL, "affinity": True}],
            **scenario.sections,
        }
        path = self.tmp / f"node-{i}-{scenario.key}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    async def start_nodes(self, scenario: Scenario) -> None:
        children = []
        for i in range(len(self.node_ports)):
            path = self._node_config(i, scenario)
            children.append(
                await self.procs.start(
                    f"node-{i}-{scenario.key}",
                    [sys.executable, "-m", "affinity_node", "serve", "--config", str(path)],
                )
            )
        self.nodes = children
        await asyncio.gather(
            *(
                wait_http_ok(self.session, f"{url}/readyz", child, f"{child.name} to be ready")
                for url, child in zip(self.node_urls, children, strict=True)
            )
        )
        if self.stats_url is not None:
            names = [f"node-{i}" for i in range(len(self.node_ports))]
            stats_url = self.stats_url

            async def up() -> bool:
                return await haproxy_servers_up(self.session, stats_url, names)

            await poll(up, None, "haproxy to see every node up")

    async def stop_nodes(self) -> None:
        if self.nodes:
            await self.procs.stop(self.nodes)
            self.nodes = None

    async def clear_caches(self) -> None:
        if self.engine_model is not None:
            await self._restart_llamacpp()
            return

        async def clear(url: str) -> None:
            async with self.session.post(
                f"{url}/admin/cache/clear", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                resp.raise_for_status()

        await asyncio.gather(*(clear(u) for u in self.backend_urls))

    async def scrape(self) -> tuple[dict[str, Any], dict[str, Any]]:
        backends = dict(
            zip(self.backend_ids, (f"{u}/metrics" for u in self.backend_urls), strict=True)
        )
        nodes = {f"node-{i}": f"{u}/metrics" for i, u in enumerate(self.node_urls)}
        b, n = await asyncio.gather(
            scrape_all(self.session, backends), scrape_all(self.session, nodes)
        )
        return b, n


# -- keys ----------------------------------------------------------------------------------


async def create_keys(dsn: str, n: int, prefix: str) -> tuple[list[uuid.UUID], list[str]]:
    from affinity_node.store.keys import create_key

    conn = await asyncpg.connect(dsn)
    try:
        ids, secrets = [], []
        for i in range(n):
            key, secret = await create_key(conn, f"{prefix}-tenant-{i:02d}")
            ids.append(key.id)
            secrets.append(secret)
        return ids, secrets
    finally:
        await conn.close()


async def delete_keys(dsn: str, ids: Sequence[uuid.UUID]) -> None:
    """Removes the demo's keys (and, by cascade, their bindings) from a database it borrowed."""
    from affinity_node.store.keys import delete_key

    conn = await asyncpg.connect(dsn)
    try:
        for key_id in ids:
            await delete_key(conn, key_id)
    finally:
        await conn.close()
