"""Scale benchmark: a node against a big binding table and a big key table, each figure next to
the same figure for a table ten times smaller, measured in the same run.

    python -m affinity_node.devtools.bench_scale [--dsn DSN] [--bindings 1000000] [--keys 1000000]

Keys first (K/10, then K, `--keys`; 0 skips them): the key snapshot query (every page), and a
node's start until it holds every key (its /readyz), its RSS against the same node with no key
(bytes per key), a request authenticated by the last key read (so it is held) and one refused.
Then bindings (`--bindings`; 0 skips them).

For each size (N/10, then N; keys x `--models` models, in an embedded Postgres unless --dsn):

1. the table: build time, table and index sizes, the snapshot query (every page, timed);
2. a node (`affinity-node serve`, its own process): seconds from start until it holds every
   binding (its /readyz), its RSS, and RSS per binding against the same node with the keys but
   no bindings;
3. a listener outage of `--outage` seconds with `--changes` changes (moves, deletions, new
   bindings): rows the reconnect read and how long the resync took;
4. three nodes while `--rate` new bindings a second are created for `--duration` seconds (the
   node's own miss transaction, spread over three pools): notifications each node received a
   second and their lag from the trigger to the node's cache (the nodes' histograms), and the
   bare delivery lag seen by a plain LISTEN connection;
5. cleanup of N/10 expired rows by the cleaner's batches: batch times (how long row locks are
   held).

--dsn needs a superuser (CREATE DATABASE; the build skips the triggers for its bulk insert).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from affinity_node.app import postgres_bindings
from affinity_node.cli import event_loop_factory
from affinity_node.devtools.bench_queries import BENCH_QUERIES as B
from affinity_node.devtools.support import with_database
from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.sim.support import (
    Child,
    Processes,
    Samples,
    SupportError,
    free_port,
    poll,
    postgres,
    scrape,
)
from affinity_node.store.keys import PostgresKeyStore
from affinity_node.store.migrate import migrate
from affinity_node.store.postgres import PoolSettings, PostgresBindingStore, create_pool
from affinity_node.store.queries import QUERIES as Q

BACKENDS = [f"http://127.0.0.1:{9 + i}" for i in range(4)]
"""Backend identities the nodes know (nothing listens: no request is sent). Bindings use the
first three; moves go to the fourth, so every move is a change."""
MODELS = ["llama-3.1-8b", "llama-3.1-70b", "qwen-2.5-7b", "mistral-7b", "gemma-2-9b"]
TTL_S = 1800.0
PAGE = 50_000
MiB = 1024 * 1024


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def note(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts (upper bound -> count)."""
    edges = sorted(buckets)
    total = buckets[edges[-1]]
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if math.isinf(edge):
                return lower
            return lower + (edge - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = edge, count
    return lower


def lag_buckets(samples: Samples) -> dict[float, float]:
    out: dict[float, float] = {}
    for (name, labels), value in samples.items():
        if name == "affinity_notify_lag_seconds_bucket":
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


@dataclass
class Figures:
    bindings: int
    keys: int
    build_s: float = math.nan
    sizes_mib: dict[str, float] = field(default_factory=dict)
    snapshot_s: float = math.nan
    page_ms: tuple[float, float] = (math.nan, math.nan)
    start_to_all_s: float = math.nan
    snapshot_load_s: float = math.nan
    start_cpu_s: float = math.nan
    loaded: int = 0
    rss_keys_mib: float = math.nan
    rss_mib: float = math.nan
    resync_mode: str = "-"
    resync_rows: int = 0
    resync_ms: float = math.nan
    healed_s: float = math.nan
    changes: int = 0
    written_per_s: float = math.nan
    received_per_s: float = math.nan
    lag_ms: tuple[float, float] = (math.nan, math.nan)
    under_50ms: float = math.nan
    delivery_ms: tuple[float, float] = (math.nan, math.nan)
    queue_max: float = math.nan
    write_errors: int = 0
    cleanup: tuple[int, int, float, float, float] = (0, 0, math.nan, math.nan, math.nan)
    """rows, batches, batch p50 ms, batch max ms, seconds"""

    @property
    def rss_per_binding(self) -> float:
        return (self.rss_mib - self.rss_keys_mib) * MiB / max(self.bindings, 1)


@dataclass
class KeyFigures:
    keys: int
    build_s: float = math.nan
    table_mib: float = math.nan
    snapshot_s: float = math.nan
    start_empty_s: float = math.nan
    start_s: float = math.nan
    start_cpu_s: float = math.nan
    held: int = 0
    rss_empty_mib: float = math.nan
    rss_mib: float = math.nan
    rss_resynced_mib: float = math.nan
    """After the node's first periodic resync (a new table built beside the old, then swapped):
    what it holds in the long run."""
    statuses: tuple[int, int] = (0, 0)
    """What the last key and an unknown one were answered (200, 401 expected)."""

    @property
    def rss_per_key(self) -> float:
        return (self.rss_mib - self.rss_empty_mib) * MiB / max(self.keys, 1)

    @property
    def rss_per_key_resynced(self) -> float:
        return (self.rss_resynced_mib - self.rss_empty_mib) * MiB / max(self.keys, 1)


class Node:
    """One `affinity-node serve` process with its ops port."""

    def __init__(self, child: Child, ops_url: str, url: str = "") -> None:
        self.child = child
        self.ops_url = ops_url
        self.url = url

    @property
    def cpu_s(self) -> float:
        """User and system CPU seconds the process used so far."""
        with open(f"/proc/{self.child.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    @property
    def rss_mib(self) -> float:
        with open(f"/proc/{self.child.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return math.nan

    async def ready(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """The /readyz body ({} while nothing answers)."""
        try:
            async with http.get(f"{self.ops_url}/readyz") as r:
                return dict(await r.json())
        except (aiohttp.ClientError, ValueError):
            return {}


class Bench:
    def __init__(self, args: argparse.Namespace, admin_dsn: str, tmp: Path) -> None:
        self.args = args
        self.admin_dsn = admin_dsn
        self.tmp = tmp
        self.procs = Processes(tmp)

    async def node(self, stack: AsyncExitStack, dsn: str, name: str) -> Node:
        port, ops = free_port(), free_port()
        cfg = {
            "node_id": name,
            "listen": {"host": "127.0.0.1", "port": port, "ops_port": ops},
            "database": {"dsn": dsn, "pool_max": 4, "startup_wait_seconds": 30},
            "affinity": {"ttl_seconds": TTL_S},
            "health": {"interval_seconds": 60},
            "logging": {"level": "WARNING"},
            "backends": [{"url": u, "models": MODELS, "kind": "vllm"} for u in BACKENDS],
            "models": [{"name": m, "affinity": True} for m in MODELS],
        }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [sys.executable, "-m", "affinity_node", "serve", "--config", str(path)]
        child = await self.procs.start(name, argv)
        stack.push_async_callback(self.procs.stop, [child])
        return Node(child, f"http://127.0.0.1:{ops}", f"http://127.0.0.1:{port}")

    async def until_loaded(
        self, http: aiohttp.ClientSession, node: Node, expected: int, timeout_s: float = 300
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal body
            body = await node.ready(http)
            snap = body.get("snapshot", {})
            return bool(snap.get("state") == "done" and snap.get("loaded", -1) >= expected)

        await poll(done, node.child, f"{node.child.name} to hold {expected} bindings", timeout_s)
        return body

    async def run_keys(self, n: int) -> KeyFigures:
        """A node against `n` keys (no bindings) in a database of its own."""
        fig = KeyFigures(keys=n)
        name = f"bench_keys_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(self.admin_dsn, name)
        try:
            await migrate(dsn)
            async with AsyncExitStack() as stack:
                await self._measure_keys(stack, dsn, fig)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        return fig

    async def _measure_keys(self, stack: AsyncExitStack, dsn: str, fig: KeyFigures) -> None:
        db = await asyncpg.connect(dsn)
        stack.push_async_callback(db.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        note(f"{fig.keys:,} keys: a node with none")
        async with AsyncExitStack() as first:
            t0 = time.perf_counter()
            empty = await self.node(first, dsn, "keys-empty")
            await self.until_keys(http, empty, 0)
            fig.start_empty_s = time.perf_counter() - t0
            fig.rss_empty_mib = empty.rss_mib
        note("keys")
        t0 = time.perf_counter()
        async with db.transaction():
            await db.execute(B["bench_triggers_off"])  # no notification per key
            await db.execute(B["bench_keys"], fig.keys, "bench")
        await db.execute(B["bench_keys_settle"])
        fig.build_s = time.perf_counter() - t0
        await db.execute(B["bench_checkpoint"])
        fig.table_mib = await db.fetchval(B["bench_keys_size"]) / MiB
        fig.snapshot_s = await self._time_key_snapshot(dsn)
        note("a node starts")
        t0 = time.perf_counter()
        node = await self.node(stack, dsn, "keys-all")
        body = await self.until_keys(http, node, fig.keys)
        fig.start_s = time.perf_counter() - t0
        fig.start_cpu_s = node.cpu_s
        fig.rss_mib = node.rss_mib
        fig.held = int(body["keys"])
        last = await db.fetchval(B["bench_keys_last"])
        fig.statuses = (
            await self._models_status(http, node, str(last)),
            await self._models_status(http, node, f"sk-{uuid.uuid4()}"),
        )
        if not self.args.no_key_resync:
            note("its first periodic key resync (about 45 s)")
            await self.until_keys(http, node, fig.keys, resyncs=2)
            fig.rss_resynced_mib = node.rss_mib

    async def until_keys(
        self,
        http: aiohttp.ClientSession,
        node: Node,
        expected: int,
        timeout_s: float = 300,
        resyncs: int = 1,
    ) -> dict[str, Any]:
        """Until the node is ready, holds `expected` keys and has loaded `resyncs` snapshots."""
        body: dict[str, Any] = {}

        async def done() -> bool:
            nonlocal body
            body = await node.ready(http)
            return (
                body.get("status") == "ready"
                and body.get("keys", -1) >= expected
                and body.get("key_resyncs", 0) >= resyncs
            )

        await poll(done, node.child, f"{node.child.name} to hold {expected} keys", timeout_s)
        return body

    async def _time_key_snapshot(self, dsn: str) -> float:
        """The key snapshot as a node reads it: every page, in id order."""
        async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as db:
            store = PostgresKeyStore(db, timeout_s=60.0)
            after = uuid.UUID(int=0)
            t0 = time.perf_counter()
            while (page := await store.active_page(after, PAGE)).rows == PAGE and page.last:
                after = page.last
            return time.perf_counter() - t0

    @staticmethod
    async def _models_status(http: aiohttp.ClientSession, node: Node, secret: str) -> int:
        headers = {"Authorization": f"Bearer {secret}"}
        async with http.get(f"{node.url}/v1/models", headers=headers) as r:
            return r.status

    async def run_size(self, n: int) -> Figures:
        models = MODELS[: self.args.models]
        keys = max(1, n // len(models))
        fig = Figures(bindings=keys * len(models), keys=keys)
        name = f"bench_scale_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(self.admin_dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(self.admin_dsn, name)
        try:
            await migrate(dsn)
            async with AsyncExitStack() as stack:
                await self._measure(stack, dsn, fig, models)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        return fig

    async def _measure(
        self, stack: AsyncExitStack, dsn: str, fig: Figures, models: list[str]
    ) -> None:
        db = await asyncpg.connect(dsn)
        stack.push_async_callback(db.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        note(f"{fig.bindings:,} bindings: keys")
        key_ids = [r[0] for r in await db.fetch(B["bench_keys"], fig.keys, "bench")]

        # The same node with the keys and no bindings: what the bindings add to its RSS.
        async with AsyncExitStack() as first:
            bare = await self.node(first, dsn, "scale-bare")
            await self.until_loaded(http, bare, 0)
            fig.rss_keys_mib = bare.rss_mib

        note("bindings")
        t0 = time.perf_counter()
        async with db.transaction():
            await db.execute(B["bench_triggers_off"])
            await db.execute(B["bench_bindings"], key_ids, models, BACKENDS[:3], TTL_S)
        await db.execute(B["bench_settle"])
        fig.build_s = time.perf_counter() - t0
        await db.execute(B["bench_checkpoint"])
        fig.sizes_mib = {r[0]: r[1] / MiB for r in await db.fetch(B["bench_sizes"])}
        await self._time_snapshot(stack, dsn, fig)

        note("a node starts")
        proxy = FaultProxy(dsn)
        await proxy.start()
        stack.push_async_callback(proxy.close)
        started = time.perf_counter()
        node = await self.node(stack, proxy.dsn, "scale-0")
        body = await self.until_loaded(http, node, fig.bindings)
        fig.start_to_all_s = time.perf_counter() - started
        fig.start_cpu_s = node.cpu_s
        fig.snapshot_load_s = float(body["snapshot"]["seconds"])
        fig.loaded = int(body["snapshot"]["loaded"])
        fig.rss_mib = node.rss_mib

        await self._outage(http, db, proxy, node, fig, sorted(key_ids))

        await self.procs.stop([node.child])  # it is behind the relay: not for timing
        note("three nodes, sustained new bindings")
        nodes = [await self.node(stack, dsn, f"scale-{i}") for i in (1, 2, 3)]
        for other in nodes:
            await self.until_loaded(http, other, fig.bindings)
        await self._notify(stack, http, dsn, db, nodes, fig)
        await self._cleanup(dsn, db, fig)

    async def _time_snapshot(self, stack: AsyncExitStack, dsn: str, fig: Figures) -> None:
        """The snapshot query as a node runs it: every page, in key order."""
        db = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        stack.push_async_callback(db.close)
        store = postgres_bindings(db)
        times: list[float] = []
        after = None
        t0 = time.perf_counter()
        while True:
            p0 = time.perf_counter()
            page = await store.snapshot_page(after, PAGE)
            times.append((time.perf_counter() - p0) * 1000)
            if page.rows < PAGE or page.last is None:
                break
            after = page.last
        fig.snapshot_s = time.perf_counter() - t0
        fig.page_ms = (pct(times, 0.5), pct(times, 0.99))

    async def _outage(
        self,
        http: aiohttp.ClientSession,
        db: asyncpg.Connection,
        proxy: FaultProxy,
        node: Node,
        fig: Figures,
        keys: list[uuid.UUID],
    ) -> None:
        """Moves from a quarter of the key space, deletions from three quarters: apart."""
        args = self.args
        version = int(await db.fetchval(Q["listener_version"]))

        async def caught_up() -> bool:
            return int((await node.ready(http)).get("snapshot", {}).get("watermark", 0)) >= version

        await poll(caught_up, node.child, "the node's watermark")
        note(f"listener outage, {args.changes} changes")
        await proxy.refuse_new()
        await db.fetchval(B["bench_terminate"], "affinity-node-listener:scale-0")

        async def down() -> bool:
            return (await node.ready(http)).get("listener") == "down"

        await poll(down, node.child, "the listener to be down")
        cut = time.monotonic()
        third = max(1, args.changes // 3)
        new_keys = [r[0] for r in await db.fetch(B["bench_keys"], third, "outage")]
        statuses = [
            await db.execute(
                B["bench_move"], keys[len(keys) // 4], args.changes - 2 * third, BACKENDS[3]
            ),
            await db.execute(B["bench_delete"], keys[3 * len(keys) // 4], third),
            await db.execute(B["bench_bindings"], new_keys, MODELS[:1], BACKENDS[:3], TTL_S),
        ]
        fig.changes = sum(int(status.split()[-1]) for status in statuses)
        await asyncio.sleep(max(0.0, args.outage - (time.monotonic() - cut)))  # its length
        healed = time.perf_counter()
        await proxy.start()
        body: dict[str, Any] = {}

        async def resynced() -> bool:
            nonlocal body
            body = await node.ready(http)
            snap = body.get("snapshot", {})
            return body.get("listener") == "up" and snap.get("state") == "done"

        await poll(resynced, node.child, "the resync")
        fig.healed_s = time.perf_counter() - healed
        snap = body["snapshot"]
        fig.resync_mode = str(snap["mode"])
        fig.resync_rows = int(snap["rows_read"])
        fig.resync_ms = float(snap["seconds"]) * 1000

    async def _notify(
        self,
        stack: AsyncExitStack,
        http: aiohttp.ClientSession,
        dsn: str,
        db: asyncpg.Connection,
        nodes: list[Node],
        fig: Figures,
    ) -> None:
        """Three writer processes (as three nodes' misses) create new bindings at the rate;
        every node hears every one."""
        args = self.args
        total = int(args.rate * args.duration)
        # New keys first, out of the measured window: every node reads the new keys (their
        # notifications say so, and the checks are batched), which a fleet sees rarely and a
        # benchmark all at once. Settled: every node checked, and no check since the last look.
        keys_before = [await scrape(http, f"{n.ops_url}/metrics") for n in nodes]
        keys = [str(r[0]) for r in await db.fetch(B["bench_keys"], total, "writer")]
        last: list[float] = []

        async def keys_known() -> bool:
            nonlocal last
            now = [await scrape(http, f"{n.ops_url}/metrics") for n in nodes]
            checks = [
                sample(a, "affinity_key_lookups_total", reason="verify")
                - sample(b, "affinity_key_lookups_total", reason="verify")
                for a, b in zip(now, keys_before, strict=True)
            ]
            settled = all(c >= 1 for c in checks) and checks == last
            last = checks
            return settled

        await poll(keys_known, None, "every node to know the writers' keys", 120.0)
        files = []
        for i in range(3):
            path = self.tmp / f"writer-{i}.keys"
            path.write_text("\n".join(keys[i::3]))
            files.append(path)
        delivery: list[float] = []

        def heard(_c: object, _pid: int, _ch: str, payload: str) -> None:
            data = json.loads(payload)
            if data.get("op") == "insert":
                delivery.append(time.time() - float(data["sent_at"]))

        listen = await asyncpg.connect(dsn)
        stack.push_async_callback(listen.close)
        await listen.add_listener("affinity_changes", heard)
        before = [await scrape(http, f"{n.ops_url}/metrics") for n in nodes]
        start_at = time.time() + 2.0  # each writer opens its pool first
        writers = [
            await self.procs.start(
                f"writer-{i}",
                [
                    *(sys.executable, "-m", "affinity_node.devtools.bench_scale", "--write"),
                    *("--dsn", dsn, "--rate", str(args.rate / 3), "--duration"),
                    *(str(args.duration), "--models", str(args.models), "--start-at"),
                    *(str(start_at), "--keys-file", str(files[i])),
                ],
            )
            for i in range(3)
        ]
        queue: list[float] = []
        while any(w.running for w in writers):
            queue.append(float(await db.fetchval(B["bench_queue_usage"])))
            await asyncio.sleep(0.2)
        results = [json.loads(w.log_path.read_text().splitlines()[-1]) for w in writers]
        written = sum(r["written"] for r in results)
        fig.write_errors = sum(r["errors"] for r in results)
        for r in results:
            for why, count in r["why"].items():
                note(f"writer error x{count}: {why}")
        elapsed = max(r["elapsed"] for r in results)
        fig.written_per_s = written / elapsed
        after: list[Samples] = []

        async def all_heard() -> bool:
            nonlocal after
            after = [await scrape(http, f"{n.ops_url}/metrics") for n in nodes]
            return all(
                sample(a, "affinity_notifications_total", op="insert")
                - sample(b, "affinity_notifications_total", op="insert")
                >= written
                for a, b in zip(after, before, strict=True)
            )

        with contextlib.suppress(SupportError):  # a lost notification shows in the figures
            await poll(all_heard, None, "every node to hear every insert", 10.0)
        received = [
            sample(a, "affinity_notifications_total", op="insert")
            - sample(b, "affinity_notifications_total", op="insert")
            for a, b in zip(after, before, strict=True)
        ]
        fig.received_per_s = min(received) / elapsed
        buckets: dict[float, float] = {}
        for a, b in zip(after, before, strict=True):
            ba, bb = lag_buckets(a), lag_buckets(b)
            for le, count in ba.items():
                buckets[le] = buckets.get(le, 0.0) + count - bb.get(le, 0.0)
        fig.lag_ms = (
            histogram_quantile(0.5, buckets) * 1000,
            histogram_quantile(0.99, buckets) * 1000,
        )
        fig.under_50ms = buckets.get(0.05, 0.0) / max(buckets.get(math.inf, 0.0), 1.0)
        fig.delivery_ms = (pct(delivery, 0.5) * 1000, pct(delivery, 0.99) * 1000)
        fig.queue_max = max(queue, default=0.0)

    async def _cleanup(self, dsn: str, db: asyncpg.Connection, fig: Figures) -> None:
        note("cleanup")
        rows = max(1, fig.bindings // 10)
        await db.execute(B["bench_expire"], uuid.UUID(int=0), rows)
        db = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        try:
            store = postgres_bindings(db)
            batches: list[float] = []
            deleted = 0
            t0 = time.perf_counter()
            while True:
                b0 = time.perf_counter()
                n = await store.delete_expired(1000)
                if n is None:  # a node is cleaning right now: its batches count as well
                    await asyncio.sleep(0.05)
                    continue
                batches.append((time.perf_counter() - b0) * 1000)
                deleted += n
                if n < 1000:
                    break
            fig.cleanup = (
                deleted,
                len(batches),
                pct(batches, 0.5),
                max(batches),
                time.perf_counter() - t0,
            )
        finally:
            await db.close()


def table(small: Figures, big: Figures, args: argparse.Namespace) -> str:
    rows: list[tuple[str, str, str]] = []

    def row(label: str, fmt: str, key: Any) -> None:
        rows.append((label, fmt.format(*key(small)), fmt.format(*key(big))))

    row("bindings (keys x models)", "{:,} ({:,} x {})", lambda f: (f.bindings, f.keys, args.models))
    row("build: bulk insert + vacuum analyze (s)", "{:.1f}", lambda f: (f.build_s,))
    row(
        "table / pkey / expires_at / version idx (MiB)",
        "{:.0f} / {:.0f} / {:.0f} / {:.0f}",
        lambda f: tuple(
            f.sizes_mib.get(k, math.nan)
            for k in (
                "api_key_model_affinity",
                "api_key_model_affinity_pkey",
                "api_key_model_affinity_expires_at_idx",
                "api_key_model_affinity_version_idx",
            )
        ),
    )
    row(f"snapshot query: all pages of {PAGE:,} (s)", "{:.2f}", lambda f: (f.snapshot_s,))
    row("snapshot page p50 / p99 (ms)", "{:.1f} / {:.1f}", lambda f: f.page_ms)
    row("node start -> holds every binding (s)", "{:.2f}", lambda f: (f.start_to_all_s,))
    row(
        "  of which the snapshot (s) / node CPU (s)",
        "{:.2f} / {:.2f}",
        lambda f: (f.snapshot_load_s, f.start_cpu_s),
    )
    row(
        "RSS: keys only / with bindings (MiB)",
        "{:.0f} / {:.0f}",
        lambda f: (f.rss_keys_mib, f.rss_mib),
    )
    row("RSS per binding (bytes)", "{:.0f}", lambda f: (f.rss_per_binding,))
    row(
        f"outage {args.outage:g} s, changes -> resync mode",
        "{:,} -> {}",
        lambda f: (f.changes, f.resync_mode),
    )
    row("resync: rows read / time (ms)", "{:,} / {:.0f}", lambda f: (f.resync_rows, f.resync_ms))
    row("heal -> listener up and synced (s)", "{:.2f}", lambda f: (f.healed_s,))
    row(
        "new bindings/s written (errors) over 3 pools",
        "{:.0f} ({})",
        lambda f: (f.written_per_s, f.write_errors),
    )
    row("notifications/s received per node (min)", "{:.0f}", lambda f: (f.received_per_s,))
    row("notify lag trigger->cache p50 / p99 (ms)", "{:.1f} / {:.1f}", lambda f: f.lag_ms)
    row("notify lag under 50 ms (%)", "{:.2f}", lambda f: (f.under_50ms * 100,))
    row("delivery to a bare LISTEN p50 / p99 (ms)", "{:.1f} / {:.1f}", lambda f: f.delivery_ms)
    row("NOTIFY queue usage max (%)", "{:.3f}", lambda f: (f.queue_max * 100,))
    row(
        "cleanup: expired rows in batches",
        "{:,} in {}",
        lambda f: f.cleanup[:2],
    )
    row(
        "cleanup batch p50 / max (ms), total (s)",
        "{:.1f} / {:.1f}, {:.2f}",
        lambda f: f.cleanup[2:],
    )
    width = max(len(r[0]) for r in rows)
    head = f"{'':<{width}}  {'N/10':>22}  {'N':>22}"
    lines = [head, "-" * len(head)]
    lines += [f"{label:<{width}}  {a:>22}  {b:>22}" for label, a, b in rows]
    return "\n".join(lines)


def key_table(small: KeyFigures, big: KeyFigures) -> str:
    rows: list[tuple[str, str, str]] = []

    def row(label: str, fmt: str, key: Any) -> None:
        rows.append((label, fmt.format(*key(small)), fmt.format(*key(big))))

    row("keys (no bindings)", "{:,}", lambda f: (f.keys,))
    row("build: bulk insert + vacuum analyze (s)", "{:.1f}", lambda f: (f.build_s,))
    row("api_keys with its indexes (MiB)", "{:.0f}", lambda f: (f.table_mib,))
    row(f"key snapshot query: all pages of {PAGE:,} (s)", "{:.2f}", lambda f: (f.snapshot_s,))
    row(
        "node start -> ready: no key / every key (s)",
        "{:.2f} / {:.2f}",
        lambda f: (f.start_empty_s, f.start_s),
    )
    row("  node CPU with every key (s)", "{:.2f}", lambda f: (f.start_cpu_s,))
    row("keys held (its /readyz)", "{:,}", lambda f: (f.held,))
    row("RSS: no key / every key (MiB)", "{:.0f} / {:.0f}", lambda f: (f.rss_empty_mib, f.rss_mib))
    row(
        "RSS per key: loaded / after a periodic resync (bytes)",
        "{:.0f} / {:.0f}",
        lambda f: (f.rss_per_key, f.rss_per_key_resynced),
    )
    row("last key read / unknown key: HTTP status", "{} / {}", lambda f: f.statuses)
    width = max(len(r[0]) for r in rows)
    head = f"{'':<{width}}  {'K/10':>22}  {'K':>22}"
    lines = [head, "-" * len(head)]
    lines += [f"{label:<{width}}  {a:>22}  {b:>22}" for label, a, b in rows]
    return "\n".join(lines)


def key_checks(big: KeyFigures) -> list[str]:
    held = big.held >= big.keys and big.statuses == (200, 401)
    worst = max(big.rss_per_key, big.rss_per_key_resynced)
    return [
        f"holds {big.keys:,} keys, under 100 bytes of RSS each: "
        f"{'yes' if held and worst < 100 else 'NO'} "
        f"({big.held:,} held, {big.rss_per_key:.0f} / {big.rss_per_key_resynced:.0f} bytes "
        f"loaded / after a resync, answers {big.statuses})",
    ]


def checks(big: Figures) -> list[str]:
    """The issue's targets, for the larger size."""
    incremental = big.resync_mode == "incremental" and big.resync_rows < 2 * big.changes
    return [
        f"holds {big.bindings:,} within 10 s of starting: "
        f"{'yes' if big.start_to_all_s < 10 else 'NO'} ({big.start_to_all_s:.2f} s)",
        f"under 200 bytes of RSS per binding: "
        f"{'yes' if big.rss_per_binding < 200 else 'NO'} ({big.rss_per_binding:.0f})",
        f"incremental resync after {big.changes:,} changes reads under {2 * big.changes:,} rows: "
        f"{'yes' if incremental else 'NO'} ({big.resync_rows:,}, {big.resync_mode})",
        f"notification lag p99 under 50 ms at {big.written_per_s:.0f} new bindings/s: "
        f"{'yes' if big.lag_ms[1] < 50 else 'NO'} ({big.lag_ms[1]:.1f} ms)",
    ]


async def write(args: argparse.Namespace, keys: list[uuid.UUID]) -> None:
    """One writer process: new bindings at `--rate` a second through the node's own miss
    transaction (lock, re-check, insert), from `--start-at` for `--duration` seconds; prints
    what it did as one JSON line."""
    models = MODELS[: args.models]
    total = min(len(keys), int(args.rate * args.duration))
    # The node's own pool (its timeouts, no reset round trip on release): a node's miss costs.
    db = await create_pool(PoolSettings(dsn=args.dsn, pool_max=10))
    store = PostgresBindingStore(db, acquire_timeout_s=10.0)  # measure lag, not drops
    errors: dict[str, int] = {}

    async def create(i: int) -> None:
        try:
            await store.create_if_absent(
                (keys[i], models[i % len(models)]), lambda: BACKENDS[i % 3], TTL_S
            )
        except Exception as exc:
            errors[repr(exc)[:120]] = errors.get(repr(exc)[:120], 0) + 1

    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    inflight: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * args.rate) + 1)
        while sent < due:
            task = asyncio.create_task(create(sent))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            sent += 1
        await asyncio.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
    await asyncio.gather(*inflight)
    elapsed = time.monotonic() - start
    await db.close()
    failed = sum(errors.values())
    print(
        json.dumps({"written": total - failed, "errors": failed, "why": errors, "elapsed": elapsed})
    )


async def run(args: argparse.Namespace, admin_dsn: str) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        bench = Bench(args, admin_dsn, Path(tmp))
        keys: tuple[KeyFigures, KeyFigures] | None = None
        bindings: tuple[Figures, Figures] | None = None
        try:
            if args.keys:
                keys = (
                    await bench.run_keys(max(1, args.keys // 10)),
                    await bench.run_keys(args.keys),
                )
            if args.bindings:
                bindings = (
                    await bench.run_size(max(1, args.bindings // 10)),
                    await bench.run_size(args.bindings),
                )
        finally:
            await bench.procs.close()
    load = os.getloadavg()
    print(
        f"scale benchmark: {args.models} models, {args.changes:,} changes in the outage, "
        f"{args.rate:g} new bindings/s for {args.duration:g} s; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores"
    )
    lines: list[str] = []
    if bindings is not None:
        print(table(*bindings, args))
        print()
        lines += checks(bindings[1])
    if keys is not None:
        print(key_table(*keys))
        lines += key_checks(keys[1])
    print()
    for line in lines:
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.bench_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="Postgres superuser DSN (default: an embedded Postgres)")
    p.add_argument("--bindings", type=int, default=1_000_000, help="N (N/10 runs first; 0: none)")
    p.add_argument("--keys", type=int, default=1_000_000, help="K (K/10 runs first; 0: none)")
    p.add_argument(
        "--no-key-resync",
        action="store_true",
        help="do not wait for a node's periodic key resync (its RSS after one is not measured)",
    )
    p.add_argument("--models", type=int, default=5, choices=range(1, len(MODELS) + 1))
    p.add_argument("--changes", type=int, default=1000, help="changes during the outage")
    p.add_argument("--outage", type=float, default=10.0, help="listener outage seconds")
    p.add_argument("--rate", type=float, default=1000.0, help="new bindings per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sustained inserts")
    p.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--keys-file", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write:  # as the node runs: on uvloop where installed
        keys = [uuid.UUID(line) for line in Path(args.keys_file).read_text().split()]
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(write(args, keys))
        return 0
    with postgres(args.dsn) as dsn:
        asyncio.run(run(args, dsn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
