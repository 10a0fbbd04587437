"""Per-key limits benchmark: a fleet of nodes behind round-robin (or skewed) traffic, one key
limited fleet-wide, twice its limit offered; prints what the fleet accepted.

    python -m affinity_node.devtools.bench_limits [--dsn DSN] [--rpm 600] [--offered 1200]
        [--duration 60] [--nodes 3] [--skew 0.0] [--tpm N]

The default is issue 25's case: 600 requests a minute, 1,200 offered in a minute over 3 nodes
(done when 540..660 are accepted). `--tpm N` limits tokens instead (accepted tokens from the
answers' usage must be within 15 % of N per minute). `--skew F` sends the fraction F of the
offers to the first node and splits the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import asyncpg

from affinity_node.app import RunningNode, run_node
from affinity_node.config import (
    BackendConfig,
    DatabaseConfig,
    ListenConfig,
    ModelConfig,
    NodeConfig,
    validate,
)
from affinity_node.devtools.support import with_database
from affinity_node.http.state import LIMITER
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.sim.support import postgres
from affinity_node.store.keys import create_key
from affinity_node.store.limits import set_limits
from affinity_node.store.migrate import migrate

MODEL = "bench-model"


@asynccontextmanager
async def fleet(dsn: str, nodes: int, backends: int) -> AsyncIterator[list[RunningNode]]:
    async with AsyncExitStack() as stack:
        fakes = []
        for i in range(backends):
            fake = await serve(FakeBackendConfig(backend_id=f"b{i}", models=[MODEL]))
            stack.push_async_callback(fake.close)
            fakes.append(fake)
        running = []
        for i in range(nodes):
            cfg = NodeConfig(
                node_id=f"bench-node-{i}",
                listen=ListenConfig(host="127.0.0.1", port=0),
                database=DatabaseConfig(dsn=dsn, pool_max=5),
                backends=[BackendConfig(url=f.url, models=[MODEL]) for f in fakes],
                models=[ModelConfig(name=MODEL)],
            )
            validate(cfg)
            running.append(await stack.enter_async_context(run_node(cfg)))
        yield running


async def limited_key(dsn: str, nodes: list[RunningNode], rpm: int | None, tpm: int | None) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        key, secret = await create_key(conn, "bench-limited")
        await set_limits(conn, key.id, "", rpm, tpm, None)
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    while any(n.app[LIMITER].of(key.id) is None for n in nodes):  # a doorbell, then a round
        if time.monotonic() > deadline:
            raise RuntimeError("the nodes did not load the key's limits within 10 s")
        await asyncio.sleep(0.05)
    return secret


async def offer(
    nodes: list[RunningNode], secret: str, per_s: float, duration: float, skew: float
) -> list[tuple[int, int, int]]:
    """(node, status, tokens used) per request, sent on a steady schedule."""
    results: list[tuple[int, int, int]] = []
    headers = {"Authorization": f"Bearer {secret}"}
    n = int(per_s * duration)

    def pick(i: int) -> int:
        if skew <= 0 or len(nodes) == 1:
            return i % len(nodes)
        if (i * 0.618034) % 1.0 < skew:
            return 0
        return 1 + i % (len(nodes) - 1)

    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> None:
            node = pick(i)
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 16,
            }
            url = f"{nodes[node].url}/v1/chat/completions"
            async with http.post(url, json=body, headers=headers) as resp:
                data = await resp.json()
                used = data.get("usage", {}).get("total_tokens", 0) if resp.status == 200 else 0
                results.append((node, resp.status, used))

        start = time.monotonic()
        tasks = []
        for i in range(n):
            delay = start + i / per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    return results


async def run(args: argparse.Namespace, admin_dsn: str) -> None:
    name = f"affinity_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    try:
        await migrate(dsn)
        async with fleet(dsn, args.nodes, 2) as nodes:
            rpm = None if args.tpm else args.rpm
            secret = await limited_key(dsn, nodes, rpm, args.tpm)
            per_s = args.offered / 60.0
            results = await offer(nodes, secret, per_s, args.duration, args.skew)
        report(args, results)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def report(args: argparse.Namespace, results: list[tuple[int, int, int]]) -> None:
    ok = [r for r in results if r[1] == 200]
    refused = sum(1 for r in results if r[1] == 429)
    other = len(results) - len(ok) - refused
    per_node = [sum(1 for r in ok if r[0] == i) for i in range(args.nodes)]
    offered_node = [sum(1 for r in results if r[0] == i) for i in range(args.nodes)]
    minutes = args.duration / 60.0
    print(
        f"per-key limits: {args.nodes} nodes, {len(results)} requests offered over "
        f"{args.duration:.0f} s ({args.offered:g}/min), skew {args.skew:g}"
    )
    print(f"   offered per node : {offered_node}")
    print(f"   accepted per node: {per_node}; refused (429): {refused}; other: {other}")
    if args.tpm:
        used = sum(r[2] for r in ok)
        expected = args.tpm * minutes
        print(
            f"   tokens accepted: {used} for a limit of {args.tpm}/min -> expected {expected:.0f}"
            f" ({(used - expected) / expected:+.1%})"
        )
    else:
        expected = args.rpm * minutes
        print(
            f"   requests accepted: {len(ok)} for a limit of {args.rpm}/min -> expected "
            f"{expected:.0f} ({(len(ok) - expected) / expected:+.1%})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.bench_limits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="Postgres admin DSN (default: an embedded Postgres)")
    p.add_argument("--rpm", type=int, default=600, help="the key's requests a minute")
    p.add_argument("--tpm", type=int, default=0, help="limit tokens a minute instead")
    p.add_argument("--offered", type=float, default=1200.0, help="requests offered a minute")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--skew", type=float, default=0.0, help="fraction of offers to node 0")
    args = p.parse_args(argv)
    with postgres(args.dsn) as dsn:
        asyncio.run(run(args, dsn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
