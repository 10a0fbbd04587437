"""`affinity-node backends ...`: the backend registry (every node applies a change within a
second, without a restart).

    backends list [--json]                  url, kind, models, state, health as the nodes see it,
                                            bindings, running/waiting from the backend itself
    backends add URL [--model M ...] [--kind vllm|external]
    backends drain URL [--deadline 10m]     no new bindings; its bindings move off, paced
    backends undrain URL
    backends remove URL [--force]           refused while it holds bindings, unless --force
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg

from affinity_node.argtypes import backend_url, duration, non_empty
from affinity_node.store.registry import PostgresRegistry
from affinity_node.upstream.load import parse_load


async def _backend_load(session: aiohttp.ClientSession, url: str) -> tuple[Any, Any]:
    """(running, waiting) from the backend's own /metrics; None when it does not say."""
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
            if r.status != 200:
                return None, None
            running, waiting, _kv = parse_load(await r.text())
            return running, waiting
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return None, None


async def _list(registry: PostgresRegistry, as_json: bool) -> int:
    rows = {r.url: r for r in await registry.rows()}
    seen = await registry.health()
    bindings = await registry.bindings()
    urls = sorted(set(seen) | {u for u, r in rows.items() if r.added})
    async with aiohttp.ClientSession() as session:
        loads = await asyncio.gather(*(_backend_load(session, u) for u in urls))
    out = []
    for url, (running, waiting) in zip(urls, loads, strict=True):
        row, view = rows.get(url), seen.get(url)
        state = row.state if row is not None else "active"
        held = bindings.get(url, 0)
        drained = state == "draining" and held == 0 and (running or 0) == 0
        out.append({
            "url": url,
            "kind": row.kind if row is not None and row.added else (view.kind if view else "-"),
            "models": list(row.models if row is not None and row.added and row.models
                           else (view.models if view else ())),
            "source": "registry" if row is not None and row.added else "config",
            "state": "drained" if drained else state,
            "drain_deadline": row.drain_deadline.isoformat()
            if row is not None and row.drain_deadline else None,
            "healthy_on": view.healthy_on if view else None,
            "nodes": view.nodes if view else 0,
            "bindings": held,
            "running": running,
            "waiting": waiting,
        })  # fmt: skip
    if as_json:
        print(json.dumps(out))
        return 0
    print(
        f"{'url':<34} {'kind':<8} {'state':<9} {'healthy':>8} {'bindings':>9} "
        f"{'running':>8} {'waiting':>8}  models"
    )
    for b in out:
        health = f"{b['healthy_on']}/{b['nodes']}" if b["nodes"] else "-"
        run = "-" if b["running"] is None else f"{b['running']:.0f}"
        wait = "-" if b["waiting"] is None else f"{b['waiting']:.0f}"
        print(
            f"{b['url']:<34} {b['kind']:<8} {b['state']:<9} {health:>8} {b['bindings']:>9} "
            f"{run:>8} {wait:>8}  {','.join(b['models']) or '(learned)'}"
        )
    return 0


async def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    conn: asyncpg.Connection = await connect()
    try:
        registry = PostgresRegistry(conn)
        cmd = args.backends_cmd
        if cmd == "list":
            return await _list(registry, args.json)
        if cmd == "add":
            await registry.add(args.url, args.kind, args.model or [])
            print(f"added {args.url} ({args.kind}); every node serves it within a second")
        elif cmd == "drain":
            deadline = (
                datetime.now(UTC) + timedelta(seconds=args.deadline) if args.deadline else None
            )
            await registry.set_state(args.url, "draining", deadline)
            print(
                f"draining {args.url}: no new bindings; its bindings move off"
                + (f" by {deadline:%H:%M:%S} UTC" if deadline else "")
            )
            print("wait until `affinity-node backends list` shows it drained")
        elif cmd == "undrain":
            await registry.set_state(args.url, "active")
            print(f"{args.url} is active again")
        elif cmd == "remove":
            held = (await registry.bindings()).get(args.url, 0)
            if held and not args.force:
                print(
                    f"{args.url} still holds {held} binding(s): drain it first, or --force",
                    file=sys.stderr,
                )
                return 1
            added = await registry.remove(args.url)
            if added is False or added is None:
                await registry.set_state(args.url, "disabled")
                print(
                    f"{args.url} is listed in the nodes' config: disabled (remove it from "
                    "the config to forget it)"
                )
            else:
                print(f"removed {args.url}")
        return 0
    finally:
        await conn.close()


def add_parser(sub: Any, add_dsn: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("backends", help="the backend registry: add, drain, remove at runtime")
    bs = p.add_subparsers(dest="backends_cmd", required=True)
    c = bs.add_parser("list", help="every backend, its state, health, bindings and load")
    c.add_argument("--json", action="store_true")
    add_dsn(c)
    c = bs.add_parser("add", help="add a backend (every node serves it within a second)")
    c.add_argument("url", type=backend_url)
    c.add_argument(
        "--model",
        action="append",
        type=non_empty,
        help="a model it serves (repeatable; default: learn from /v1/models)",
    )
    c.add_argument("--kind", choices=["vllm", "external"], default="vllm")
    add_dsn(c)
    c = bs.add_parser("drain", help="no new bindings; move its bindings off, paced")
    c.add_argument("url", type=backend_url)
    c.add_argument("--deadline", type=duration, help="move everything off within this long")
    add_dsn(c)
    c = bs.add_parser("undrain", help="back to active")
    c.add_argument("url", type=backend_url)
    add_dsn(c)
    c = bs.add_parser("remove", help="forget a backend (refused while it holds bindings)")
    c.add_argument("url", type=backend_url)
    c.add_argument("--force", action="store_true", help="even if it holds bindings")
    add_dsn(c)
