"""Open-loop client: POSTs at a fixed rate and prints one JSON line of latency figures.

    python -m affinity_node.devtools.overhead_client URL --rate 1000 --duration 10 \
        (--body '{...}' | --body-file PATH)   (the API key comes from $BENCH_API_KEY: ps shows argv)

Debian ships wrk but not wrk2, and wrk is closed-loop: at full load its latencies measure the
queue it builds itself. Sends here follow a clock, never the responses, so a slow target
cannot slow the offered load down. Latency runs from the moment a request is dispatched to
its last body byte; `lag` (dispatch minus schedule) says whether the client kept up, since
the event loop's timers have millisecond granularity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp


def pct(ordered: Sequence[float], q: float) -> float:
    """`ordered` sorted ascending; nearest-rank percentile, 0.0 when empty."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(
    url: str, body: bytes, headers: dict[str, str], rate: float, duration: float
) -> dict[str, Any]:
    clock = time.perf_counter  # uvloop's loop.time() only counts milliseconds
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()
    pending: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float) -> None:
            started = clock()
            lags.append(started - scheduled)
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
                return
            statuses[status] += 1
            if status == "200":
                latencies.append(clock() - started)

        total = int(rate * duration)
        t0 = clock() + 0.01
        for i in range(total):
            scheduled = t0 + i / rate
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        sent_by = clock()
        if pending:
            _done, late = await asyncio.wait(pending, timeout=10)
            for task in late:
                task.cancel()
            if late:
                statuses["unfinished"] += len(late)
    latencies.sort()
    lags.sort()
    elapsed = max(sent_by - t0, 1e-9)
    return {
        "sent": total,
        "ok": len(latencies),
        "statuses": dict(statuses),
        "offered_rps": total / elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pct(latencies, 0.50) * 1e3,
        "p99_ms": pct(latencies, 0.99) * 1e3,
        "max_ms": (latencies[-1] if latencies else 0.0) * 1e3,
        "lag_p99_ms": pct(lags, 0.99) * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=10.0)
    body = p.add_mutually_exclusive_group(required=True)
    body.add_argument("--body")
    body.add_argument("--body-file", type=Path, help="for bodies too big for one argv string")
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    headers = {"Content-Type": "application/json"}
    secret = os.environ.get("BENCH_API_KEY")
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    data = args.body_file.read_bytes() if args.body_file else args.body.encode()
    result = asyncio.run(run(args.url, data, headers, args.rate, args.duration))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
