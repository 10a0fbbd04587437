"""Engine benchmark: prints figures, each next to a baseline measured in the same run.

    python -m affinity_node.devtools.bench_engine [--dsn DSN]

1. hit latency of `resolve` against a plain dict lookup (same timing harness);
2. cold-miss latency with 1, 10 and 100 concurrent misses on one pair, over 3 nodes;
3. notification latency: a rebind on one node until another node's cache shows it;
4. database statements per 1000 resolves on a steady workload of 1000 pairs, against the
   original design's one read per request plus one write per completion;
5. per-key limits: an admission of a limited key (3 limiters exchanging through Postgres
   once a second) against an unlimited key's lookup, and the statements of the run: the
   exchange's, none per request.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg

from affinity_node.app import EngineSpec
from affinity_node.auth.limits import Limiter
from affinity_node.config import DatabaseConfig
from affinity_node.devtools.support import EngineNode, engine_nodes, with_database
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.sim.support import postgres
from affinity_node.store.keys import create_key
from affinity_node.store.limits import PostgresLimitStore, set_limits
from affinity_node.store.migrate import migrate
from affinity_node.tasks import every, stopping

BACKENDS = ("http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000")
MODEL = "llama-3.1-8b"


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Chooser:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, candidates: Sequence[str]) -> str:
        self.calls += 1
        return candidates[self.calls % len(candidates)]


class StatementCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, _record: Any) -> None:
        self.count += 1


@asynccontextmanager
async def fleet(
    dsn: str, n: int, counter: StatementCounter | None = None, **engine: Any
) -> AsyncIterator[list[EngineNode]]:
    specs = [
        EngineSpec(
            db=DatabaseConfig(dsn=dsn, pool_max=10),
            node_id=f"bench-{i}",
            engine=replace(EngineSettings(), **engine),
        )
        for i in range(n)
    ]
    async with engine_nodes(specs, on_query=counter, background=True) as out:
        yield out


async def make_keys(dsn: str, n: int) -> list[uuid.UUID]:
    conn = await asyncpg.connect(dsn)
    try:
        ids = []
        async with conn.transaction():
            for i in range(n):
                key, _ = await create_key(conn, f"bench-{i}")
                ids.append(key.id)
        return ids
    finally:
        await conn.close()


async def bench_hits(dsn: str, n_pairs: int, calls: int) -> None:
    keys = await make_keys(dsn, n_pairs)
    chooser = Chooser()
    async with fleet(dsn, 1) as (node,):
        for k in keys:
            await node.engine.resolve(k, MODEL, BACKENDS, chooser)
        plain = {(k, MODEL): BACKENDS[0] for k in keys}
        pairs = [(keys[i % len(keys)], MODEL) for i in range(calls)]
        clock = time.perf_counter_ns
        resolve = node.engine.resolve
        hit_ns: list[int] = []
        dict_ns: list[int] = []
        for _round in range(2):  # the first round warms caches and the interpreter
            hit_ns.clear()
            dict_ns.clear()
            for k, m in pairs:
                t0 = clock()
                await resolve(k, m, BACKENDS, chooser)
                hit_ns.append(clock() - t0)
            for p in pairs:
                t0 = clock()
                plain.get(p)
                dict_ns.append(clock() - t0)
        timer = [0] * 20000
        for i in range(len(timer)):
            t0 = clock()
            timer[i] = clock() - t0
        hits = node.metrics_registry.get_sample_value("affinity_cache_hits_total", {"model": MODEL})
        print(f"1. hit latency (in-process, per call, {calls} calls over {n_pairs} pairs)")
        print(
            f"   resolve() hit : p50 {pct(hit_ns, 0.5) / 1000:6.2f} us   "
            f"p99 {pct(hit_ns, 0.99) / 1000:6.2f} us"
        )
        print(
            f"   dict.get()    : p50 {pct(dict_ns, 0.5) / 1000:6.2f} us   "
            f"p99 {pct(dict_ns, 0.99) / 1000:6.2f} us   (baseline)"
        )
        print(f"   timer alone   : p50 {pct(timer, 0.5) / 1000:6.2f} us")
        print(
            f"   ratio p50 {pct(hit_ns, 0.5) / max(pct(dict_ns, 0.5), 1):.1f}x dict; "
            f"hits counted {hits:.0f}; chooser calls {chooser.calls} (warm-up only)"
        )


async def bench_cold_misses(dsn: str, rounds: int) -> None:
    print("2. cold-miss latency, N concurrent callers for one new pair, spread over 3 nodes")
    async with fleet(dsn, 3) as nodes:
        for concurrency in (1, 10, 100):
            keys = await make_keys(dsn, rounds)
            lat: list[float] = []
            for k in keys:
                chooser = Chooser()

                async def one(i: int, k: uuid.UUID = k, chooser: Chooser = chooser) -> float:
                    t0 = time.perf_counter()
                    await nodes[i % 3].engine.resolve(k, MODEL, BACKENDS, chooser)
                    return time.perf_counter() - t0

                lat.extend(await asyncio.gather(*(one(i) for i in range(concurrency))))
                assert chooser.calls == 1, chooser.calls
            print(
                f"   {concurrency:>3} concurrent: p50 {pct(lat, 0.5) * 1000:6.2f} ms   "
                f"p99 {pct(lat, 0.99) * 1000:6.2f} ms   ({rounds} pairs, chooser ran once each)"
            )


async def bench_notify(dsn: str) -> None:
    keys = await make_keys(dsn, 200)
    chooser = Chooser()
    async with fleet(dsn, 2) as (a, b):
        for k in keys:
            await a.engine.resolve(k, MODEL, BACKENDS, chooser)
        lat: list[float] = []
        for k in keys:
            entry = a.engine.cache.get((k, MODEL))
            assert entry is not None
            old = entry.backend
            healthy = [x for x in BACKENDS if x != old]
            t0 = time.perf_counter()
            await a.engine.resolve(k, MODEL, healthy, chooser)
            deadline = t0 + 2
            while (e := b.engine.cache.get((k, MODEL))) is None or e.backend == old:
                if time.perf_counter() > deadline:
                    raise RuntimeError("notification did not arrive within 2 s")
                await asyncio.sleep(0)
            lat.append(time.perf_counter() - t0)
        h = b.metrics_registry
        count = h.get_sample_value("affinity_notify_lag_seconds_count") or 0
        total = h.get_sample_value("affinity_notify_lag_seconds_sum") or 0
        print("3. rebind on node A until node B's cache shows it (includes A's UPDATE round trip)")
        print(
            f"   p50 {pct(lat, 0.5) * 1000:6.2f} ms   p99 {pct(lat, 0.99) * 1000:6.2f} ms   "
            f"({len(lat)} rebinds); trigger-to-cache mean from the lag histogram "
            f"{total / max(count, 1) * 1000:.2f} ms"
        )


async def bench_statements(
    dsn: str, n_pairs: int, duration: float, rate: float, ttl: float
) -> None:
    keys = await make_keys(dsn, n_pairs)
    counter = StatementCounter()
    chooser = Chooser()
    async with fleet(dsn, 3, counter, ttl_seconds=ttl, refresh_flush_interval_s=1.0) as nodes:
        rng = random.Random(7)
        # Warm-up: every pair bound once (these misses are the only per-pair statements).
        for i, k in enumerate(keys):
            await nodes[i % 3].engine.resolve(k, MODEL, BACKENDS, chooser)
        warm_statements = counter.count
        counter.count = 0
        resolves = 0
        start = time.perf_counter()
        next_at = start
        while (now := time.perf_counter()) - start < duration:
            if now < next_at:
                await asyncio.sleep(next_at - now)
            next_at += 100 / rate
            for _ in range(100):
                node = nodes[rng.randrange(3)]
                k = keys[rng.randrange(len(keys))]
                r = await node.engine.resolve(k, MODEL, BACKENDS, chooser)
                node.engine.served(k, MODEL, r.backend)  # as the proxy does after success
                resolves += 1
        steady = counter.count
        outcomes = {
            o: sum(
                n.metrics_registry.get_sample_value(
                    "affinity_cache_misses_total", {"model": MODEL, "outcome": o}
                )
                or 0
                for n in nodes
            )
            for o in ("created", "found_in_db", "found_after_lock", "degraded")
        }
        refreshes = sum(
            n.metrics_registry.get_sample_value("affinity_refresh_writes_total") or 0 for n in nodes
        )
    per_1000 = steady / resolves * 1000
    print(
        f"4. statements per 1000 resolves: {n_pairs} pairs, 3 nodes, {resolves} resolves in "
        f"{duration:.0f} s, TTL {ttl:.0f} s, refresh flush 1 s"
    )
    print(f"   warm-up ({n_pairs} first misses): {warm_statements} statements")
    print(
        f"   steady state: {steady} statements (refresh batches {refreshes:.0f}, "
        f"listener probes and asyncpg internals included) = {per_1000:.2f} per 1000 resolves"
    )
    print(
        f"   original design (1 read + 1 write per request): 2000 per 1000 resolves -> "
        f"{2000 / max(per_1000, 1e-9):.0f}x fewer; miss outcomes over the whole run {outcomes}"
    )


async def bench_limits(dsn: str, duration: float, rate: float) -> None:
    counter = StatementCounter()

    async def logged(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(counter)

    key = (await make_keys(dsn, 1))[0]
    conn = await asyncpg.connect(dsn)
    try:
        await set_limits(conn, key, "", 6_000_000, None, None)  # never refuses here
    finally:
        await conn.close()
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=logged) for _ in "abc"]
    limiters = [Limiter(PostgresLimitStore(p), f"bench-{i}") for i, p in enumerate(pools)]
    try:
        for limiter in limiters:
            await limiter.round()
        counter.count = 0
        free = uuid.uuid4()
        clock = time.perf_counter_ns
        admit_ns: list[int] = []
        lookup_ns: list[int] = []
        admits = during = 0
        async with stopping(*(every(1.0, x.round, "bench-limits", now=True) for x in limiters)):
            start = time.perf_counter()
            next_at = start
            while (now := time.perf_counter()) - start < duration:
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at += 100 / rate
                before = counter.count
                for i in range(100):  # no await in here: nothing else runs meanwhile
                    limiter = limiters[i % 3]
                    t0 = clock()
                    scopes = limiter.of(key)
                    assert scopes is not None
                    ticket = limiter.admit(scopes, MODEL, 100)
                    limiter.finish(ticket, 90)
                    admit_ns.append(clock() - t0)
                    t0 = clock()
                    limiter.of(free)
                    lookup_ns.append(clock() - t0)
                    admits += 1
                during += counter.count - before
        rounds = sum(x.exchanged for x in limiters) - 3
    finally:
        for limiter in limiters:
            await limiter.leave()
        for pool in pools:
            await pool.close()
    print(f"5. per-key limits: {admits} admissions over 3 limiters in {duration:.0f} s")
    print(
        f"   limited key, admit + finish : p50 {pct(admit_ns, 0.5) / 1000:6.2f} us   "
        f"p99 {pct(admit_ns, 0.99) / 1000:6.2f} us"
    )
    print(
        f"   unlimited key, one lookup   : p50 {pct(lookup_ns, 0.5) / 1000:6.2f} us   "
        f"p99 {pct(lookup_ns, 0.99) / 1000:6.2f} us   (what every request pays)"
    )
    print(
        f"   statements: {during} during the admissions; {counter.count} in the run, for "
        f"{rounds} exchange rounds (3 nodes, 1 s each; asyncpg's type introspection on a "
        "connection's first use included)"
    )


async def run(args: argparse.Namespace, dsn: str) -> None:
    admin = await asyncpg.connect(dsn)
    name = f"affinity_bench_{uuid.uuid4().hex[:8]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    db = with_database(dsn, name)
    try:
        await migrate(db)
        await bench_hits(db, args.pairs, args.calls)
        await bench_cold_misses(db, args.rounds)
        await bench_notify(db)
        await bench_statements(db, args.pairs, args.duration, args.rate, args.ttl)
        await bench_limits(db, min(args.duration, 10.0), args.rate)
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.bench_engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="Postgres admin DSN (default: an embedded Postgres)")
    p.add_argument("--duration", type=float, default=20.0, help="steady workload seconds")
    p.add_argument("--rate", type=float, default=5000.0, help="steady resolves per second")
    p.add_argument(
        "--ttl",
        type=float,
        default=10.0,
        help="binding TTL for the steady workload (short, so refreshes happen)",
    )
    p.add_argument("--pairs", type=int, default=1000, help="(api key, model) pairs")
    p.add_argument("--calls", type=int, default=200_000, help="timed hit resolves")
    p.add_argument("--rounds", type=int, default=30, help="new pairs per cold-miss level")
    args = p.parse_args(argv)
    with postgres(args.dsn) as dsn:
        asyncio.run(run(args, dsn))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
