"""`affinity-node backends ...`: the backend registry (every node applies a change within a
second, without a restart).

    backends list [--json]                  url, kind, models, state, health as the nodes see it,
                                            bindings, the nodes' requests in flight to it
    backends add URL [--model M ...] [--kind vllm|llamacpp|external]
    backends drain URL [--deadline 10m]     no new bindings; its bindings move off, paced
    backends undrain URL
    backends remove URL [--force]           refused while it holds bindings, unless --force

Writing the registry takes an admin role (affinity_admin in deploy/postgres/roles.sql); the
serving role only reads it. `list` and `add` check `backends.allow` (from `--config FILE`, else
AFFINITY_BACKENDS_ALLOW): `add` refuses a host outside it, `list` shows such rows as refused.
`list` reads only the database: it sends nothing to any backend URL (a registry row could
name any host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from affinity_node.argtypes import backend_url, duration, non_empty
from affinity_node.config import ConfigError, HostAllowList, env_allow_list, load_config
from affinity_node.store.registry import PostgresRegistry
from affinity_node.vocabulary import BACKEND_KINDS


def _allow_list(config: str | None) -> HostAllowList:
    """The nodes' `backends.allow`: from their config file when given, else the environment."""
    if config is not None:
        return load_config(config).allow
    return HostAllowList.parse(env_allow_list(os.environ), "AFFINITY_BACKENDS_ALLOW")


async def _list(backend_registry: PostgresRegistry, as_json: bool, allow: HostAllowList) -> int:
    rows = {r.url: r for r in await backend_registry.rows()}
    seen = await backend_registry.health()
    bindings = await backend_registry.bindings()
    urls = sorted(set(seen) | {u for u, r in rows.items() if r.added})
    out: list[dict[str, Any]] = []
    for url in urls:
        row, view = rows.get(url), seen.get(url)
        state = row.state if row is not None else "active"
        held = bindings.get(url, 0)
        inflight = view.inflight if view else 0
        drained = state == "draining" and held == 0 and inflight == 0
        refused = not allow.allows_url(url)
        out.append({
            "url": url,
            "kind": row.kind if row is not None and row.added else (view.kind if view else "-"),
            "models": list(row.models if row is not None and row.added and row.models
                           else (view.models if view else ())),
            "source": "registry" if row is not None and row.added else "config",
            "state": "refused" if refused else "drained" if drained else state,
            "refused": refused,
            "drain_deadline": row.drain_deadline.isoformat()
            if row is not None and row.drain_deadline else None,
            "healthy_on": view.healthy_on if view else None,
            "nodes": view.nodes if view else 0,
            "bindings": held,
            "inflight": inflight,
        })  # fmt: skip
    if as_json:
        print(json.dumps(out))
        return 0
    print(
        f"{'url':<34} {'kind':<8} {'state':<9} {'healthy':>8} {'bindings':>9} "
        f"{'inflight':>8}  models"
    )
    for b in out:
        health = f"{b['healthy_on']}/{b['nodes']}" if b["nodes"] else "-"
        print(
            f"{b['url']:<34} {b['kind']:<8} {b['state']:<9} {health:>8} {b['bindings']:>9} "
            f"{b['inflight']:>8}  {','.join(b['models']) or '(learned)'}"
        )
    return 0


async def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    cmd = args.backends_cmd
    try:
        allow = _allow_list(getattr(args, "config", None))
    except ConfigError as exc:
        print(f"backends {cmd}: {exc}", file=sys.stderr)
        return 2
    if cmd == "add" and not allow.allows_url(args.url):
        print(
            f"backends add: {args.url} is refused: its host is not in backends.allow "
            "(the nodes would never use it)",
            file=sys.stderr,
        )
        return 1
    conn: asyncpg.Connection = await connect()
    try:
        backend_registry = PostgresRegistry(conn)
        if cmd == "list":
            return await _list(backend_registry, args.json, allow)
        if cmd == "add":
            await backend_registry.add(args.url, args.kind, args.model or [])
            print(f"added {args.url} ({args.kind}); every node serves it within a second")
        elif cmd == "drain":
            deadline = (
                datetime.now(UTC) + timedelta(seconds=args.deadline) if args.deadline else None
            )
            await backend_registry.set_state(args.url, "draining", deadline)
            print(
                f"draining {args.url}: no new bindings; its bindings move off"
                + (f" by {deadline:%H:%M:%S} UTC" if deadline else "")
            )
            print("wait until `affinity-node backends list` shows it drained")
        elif cmd == "undrain":
            await backend_registry.set_state(args.url, "active")
            print(f"{args.url} is active again")
        elif cmd == "remove":
            held = (await backend_registry.bindings()).get(args.url, 0)
            if held and not args.force:
                print(
                    f"{args.url} still holds {held} binding(s): drain it first, or --force",
                    file=sys.stderr,
                )
                return 1
            added = await backend_registry.remove(args.url)
            if added is False or added is None:
                await backend_registry.set_state(args.url, "disabled")
                print(
                    f"{args.url} is listed in the nodes' config: disabled (remove it from "
                    "the config to forget it)"
                )
            else:
                print(f"removed {args.url}")
        return 0
    except asyncpg.InsufficientPrivilegeError:
        print(
            f"backends {cmd}: this database role may not change the backend registry: use an "
            "admin DSN (affinity_admin in deploy/postgres/roles.sql), not the serving role's",
            file=sys.stderr,
        )
        return 1
    finally:
        await conn.close()


def add_parser(sub: Any, add_dsn: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("backends", help="the backend registry: add, drain, remove at runtime")
    bs = p.add_subparsers(dest="backends_cmd", required=True)
    c = bs.add_parser("list", help="every backend, its state, health, bindings and load")
    c.add_argument("--json", action="store_true")
    _add_config(c)
    add_dsn(c)
    c = bs.add_parser("add", help="add a backend (every node serves it within a second)")
    c.add_argument("url", type=backend_url)
    c.add_argument(
        "--model",
        action="append",
        type=non_empty,
        help="a model it serves (repeatable; default: learn from /v1/models)",
    )
    c.add_argument("--kind", choices=BACKEND_KINDS, default="vllm")
    _add_config(c)
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


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="the nodes' config file, for backends.allow (default: AFFINITY_BACKENDS_ALLOW)",
    )
