"""`affinity-node usage [--since 24h] [--key NAME|ID] [--model M] [--json]`: the usage ledger
per tenant, (API key, model), most lost cache first.

"Lost cache" is the prompt tokens the backends had to compute (prompt - cached): where a
tenant's latency goes. Next to it, what explains it: the hit rate, how many backends served
the tenant (more than its binding set means its prefix was computed again elsewhere), and the
requests that were rebound (its backend failed) or spilled (its backend was overloaded). The
window takes every hour that overlaps it (the ledger counts per hour).
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg

from affinity_node.argtypes import duration, non_empty
from affinity_node.store.ledger_store import usage_report
from affinity_node.vocabulary import LEDGER_OUTCOMES


def tenant(r: asyncpg.Record) -> dict[str, Any]:
    """One (key, model) of the report, as `--json` prints it."""
    prompt, cached = r["prompt_tokens"], r["cached_tokens"]
    return {
        "api_key_id": str(r["api_key_id"]),
        "key_name": r["key_name"],
        "model": r["model"],
        "requests": r["requests"],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "uncached_tokens": prompt - cached,
        "completion_tokens": r["completion_tokens"],
        "hit_rate": cached / prompt if prompt else None,
        "backends": list(r["backends"]),
        "outcomes": {o: r[f"{o}_requests"] for o in LEDGER_OUTCOMES},
    }


def _since(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def render(tenants: list[dict[str, Any]], since_s: float) -> str:
    if not tenants:
        return f"no usage recorded in the last {_since(since_s)}"
    head = (
        f"{'tenant':<30} {'model':<22} {'requests':>9} {'prompt tok':>12} {'hit rate':>9} "
        f"{'lost tok':>12} {'backends':>8} {'rebinds':>8} {'spills':>7}"
    )
    lines = [f"usage in the last {_since(since_s)}, most lost cache (uncached prompt) first", head]
    for t in tenants:
        name = f"{t['key_name'][:19]} ({t['api_key_id'][:8]})"
        rate = "-" if t["hit_rate"] is None else f"{100 * t['hit_rate']:.1f}%"
        lines.append(
            f"{name:<30} {t['model'][:22]:<22} {t['requests']:>9,} {t['prompt_tokens']:>12,} "
            f"{rate:>9} {t['uncached_tokens']:>12,} {len(t['backends']):>8} "
            f"{t['outcomes']['rebind']:>8,} {t['outcomes']['spill']:>7,}"
        )
    prompt = sum(t["prompt_tokens"] for t in tenants)
    cached = sum(t["cached_tokens"] for t in tenants)
    rate = "-" if not prompt else f"{100 * cached / prompt:.1f}%"
    lines.append(
        f"{'all':<30} {'':<22} {sum(t['requests'] for t in tenants):>9,} {prompt:>12,} "
        f"{rate:>9} {prompt - cached:>12,}"
    )
    return "\n".join(lines)


async def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    key_id: uuid.UUID | None = None
    key_name: str | None = None
    if args.key is not None:
        try:
            key_id = uuid.UUID(args.key)
        except ValueError:
            key_name = args.key
    conn: asyncpg.Connection = await connect()
    try:
        rows = await usage_report(conn, timedelta(seconds=args.since), key_id, key_name, args.model)
    finally:
        await conn.close()
    tenants = [tenant(r) for r in rows]
    if args.json:
        print(json.dumps({"since_seconds": args.since, "tenants": tenants}))
    else:
        print(render(tenants, args.since))
    return 0


def add_parser(sub: Any, add_dsn: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "usage",
        help="the usage ledger per tenant: requests, prompt tokens, cache hit rate, backends, "
        "rebinds and spills, most lost cache first",
        description=(__doc__ or "").split("\n\n", 1)[1],
    )
    p.add_argument(
        "--since",
        type=duration,
        default=86400.0,
        help="how far back, e.g. 90m, 24h, 7d (default 24h; whole hours are counted)",
    )
    p.add_argument("--key", type=non_empty, help="one tenant: its key id, or every key of a name")
    p.add_argument("--model", type=non_empty, help="one canonical model")
    p.add_argument("--json", action="store_true")
    add_dsn(p)
