"""Fault benchmark: what a database failure costs the requests that miss the cache.

    python -m affinity_node.devtools.bench_faults [--dsn DSN] [--duration 8]

One engine node reaches Postgres through a loopback relay that can freeze (packets held, no
reset: a hung host). Workers resolve new pairs (every resolve is a cold miss) for `--duration`
seconds with the database healthy (the baseline), then again with it frozen; the report gives
miss latency p50/p99/max for both, counting only misses that started after the first failure
was seen (the first ones wait for a timeout by nature).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Sequence

import asyncpg

from affinity_node.app import EngineSpec
from affinity_node.config import DatabaseConfig
from affinity_node.devtools.support import EngineNode, engine_nodes, with_database
from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.sim.support import postgres
from affinity_node.store.keys import create_key
from affinity_node.store.migrate import migrate

BACKENDS = ("http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_misses(
    node: EngineNode, key: uuid.UUID, workers: int, duration: float, interval: float = 0.02
) -> list[tuple[float, float, str]]:
    """(start, seconds, outcome) of every miss."""
    out: list[tuple[float, float, str]] = []
    deadline = time.monotonic() + duration

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            i += 1
            start = time.monotonic()
            res = await node.engine.resolve(
                key, f"m-{w}-{i}-{uuid.uuid4().hex[:6]}", BACKENDS, lambda c: c[0]
            )
            out.append((start, time.monotonic() - start, res.outcome))
            await asyncio.sleep(interval)  # paced: each worker offers `1 / interval` misses/s

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return out


def line(label: str, records: list[tuple[float, float, str]]) -> str:
    ms = [s * 1000 for _, s, _ in records]
    degraded = sum(1 for *_, o in records if o == "degraded")
    return (
        f"  {label:<34} {len(ms):>6} misses  p50 {pct(ms, 0.5):8.2f} ms  "
        f"p99 {pct(ms, 0.99):8.2f} ms  max {max(ms, default=float('nan')):8.1f} ms  "
        f"degraded {degraded}"
    )


async def run(args: argparse.Namespace, admin_dsn: str) -> None:
    name = f"bench_faults_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(admin_dsn, name)
    try:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        key, _ = await create_key(conn, "bench")
        await conn.close()
        proxy = FaultProxy(dsn)
        await proxy.start()
        spec = EngineSpec(
            db=DatabaseConfig(
                dsn=proxy.dsn, pool_max=10, statement_timeout_ms=2000, startup_wait_seconds=5
            ),
            node_id="bench-faults",
        )
        async with engine_nodes([spec]) as (node,):
            healthy = await run_misses(node, key.id, args.workers, args.duration)
            proxy.freeze()
            frozen_at = time.monotonic()
            frozen = await run_misses(node, key.id, args.workers, args.duration)
            first_failure = min((s + d for s, d, o in frozen if o == "degraded"), default=None)
            after = [r for r in frozen if first_failure is not None and r[0] >= first_failure]
            await proxy.start()
        await proxy.close()
        print(
            f"miss latency, {args.workers} workers offering {args.workers * 50} misses/s, "
            f"{args.duration:g} s each (statement timeout 2 s)"
        )
        print(line("database healthy (baseline)", healthy))
        print(line("frozen: every miss", frozen))
        print(line("frozen: after the first failure", after))
        if first_failure is not None:
            print(f"  first failure seen {first_failure - frozen_at:.2f} s after the freeze")
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.bench_faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="Postgres admin DSN (default: an embedded Postgres)")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--workers", type=int, default=20)
    args = p.parse_args(argv)
    with postgres(args.dsn) as dsn:
        asyncio.run(run(args, dsn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
