"""`affinity-node demo`: a whole fleet on one machine, the same workload three ways.

Starts Postgres (embedded unless `--dsn`), N fake vLLM backends, M proxy nodes and HAProxy in
front of them when the binary exists, then runs one multi-tenant chat workload three times:

1. affinity off: every request goes to the least busy backend (what a plain balancer does);
2. node-local affinity (`affinity.store: memory`): each node pins pairs on its own, as routers
   without shared state do; behind a load balancer the nodes pin the same pair to different
   backends, so a tenant's prefixes are spread (and duplicated) over several caches;
3. shared affinity (`affinity.store: postgres`): one binding per pair for every node.

Between runs the nodes restart with the next config and the backends' prefix caches are
cleared, so each run starts cold; figures are deltas over the run. The backends' caches are
sized like a real fleet's: none can hold every tenant's prefixes, all together can.

Every child process runs in its own session (Ctrl-C at the terminal reaches only this
driver, which then stops them in order); all are stopped, and temporary files removed, on
success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg

from affinity_node.argtypes import (
    dsn as dsn_arg,
)
from affinity_node.argtypes import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from affinity_node.sim.fleet import MODEL, Fleet, Scenario, create_keys, delete_keys
from affinity_node.sim.haproxy import find_haproxy
from affinity_node.sim.render import ProgressLine, render_table, report_json
from affinity_node.sim.report import RunReport, build_report, deltas
from affinity_node.sim.support import Processes, SupportError, free_port, postgres
from affinity_node.sim.workload import Workload, WorkloadConfig, estimate_working_set_blocks

DSN_ENV = "AFFINITY_DATABASE_DSN"
FLEET_CAPACITY = 1.2
"""All backends' caches together hold this many times the workload's prefix blocks; each
holds FLEET_CAPACITY / N of it (0.3 with 4 backends): a pinned tenant fits, every tenant
on every backend does not."""

SCENARIOS = (
    Scenario("off", "affinity off", {"enabled": False}),
    Scenario("node_local", "node-local affinity", {"enabled": True, "store": "memory"}),
    Scenario("shared", "shared affinity", {"enabled": True, "store": "postgres"}),
)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (with the failing process's log tail)."""


# -- the demo --------------------------------------------------------------------------------


def workload_config(
    args: argparse.Namespace, base_urls: Sequence[str], secrets: Sequence[str]
) -> WorkloadConfig:
    rate = None if args.concurrency else args.rate
    return WorkloadConfig(
        base_urls=tuple(base_urls),
        api_keys=tuple(secrets),
        models=(MODEL,),
        tenants=args.keys,
        conversations_per_tenant=args.conversations,
        max_turns=args.max_turns,
        max_tokens=args.output_tokens,
        rate=rate,
        concurrency=args.concurrency or None,
        duration_s=args.duration,
        seed=args.seed,
        spread="round_robin",
    )


def cache_blocks_for(
    cfg: WorkloadConfig,
    backends: int,
    expected_requests: int,
    fleet_capacity: float = FLEET_CAPACITY,
) -> int:
    """Per-backend cache: `fleet_capacity` x the run's prefix blocks, split over the fleet."""
    blocks = estimate_working_set_blocks(cfg, expected_requests=expected_requests)
    return max(64, math.ceil(blocks * fleet_capacity / backends))


def _log_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    haproxy = None if args.no_haproxy else find_haproxy()
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-demo-")))
        log_dir = _log_dir(args.log_dir) if args.log_dir else tmp
        from affinity_node.store.migrate import migrate

        if args.dsn is None:
            _say("starting an embedded Postgres ...")
        dsn = stack.enter_context(postgres(args.dsn))
        await migrate(dsn)
        run_id = uuid.uuid4().hex[:8]
        key_ids, secrets = await create_keys(dsn, args.keys, f"demo-{run_id}")
        if args.dsn is not None:
            stack.push_async_callback(delete_keys, dsn, key_ids)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        procs = Processes(log_dir)
        stack.push_async_callback(procs.close)
        fleet = Fleet(
            procs,
            session,
            tmp,
            dsn,
            backend_ports=[free_port() for _ in range(args.backends)],
            node_ports=[free_port() for _ in range(args.nodes)],
            node_log_level="INFO" if args.log_dir else "WARNING",
        )

        probe = workload_config(args, ["http://unused"], secrets)
        expected = (
            round(args.rate * args.duration)
            if probe.rate is not None
            else args.concurrency * 20 * math.ceil(args.duration)
        )
        cache_blocks = cache_blocks_for(probe, args.backends, expected, args.fleet_cache)
        _say(
            f"starting {args.backends} fake backends (prefix cache {cache_blocks} blocks "
            f"each, prefill {args.prefill_per_token * 1000:.2f} ms per uncached token) ..."
        )
        await fleet.start_backends(
            cache_blocks, args.prefill_per_token, args.output_tokens, args.seed
        )
        if haproxy is not None:
            await fleet.start_haproxy(haproxy, args.balance)
            assert fleet.lb_url is not None
            base_urls = [fleet.lb_url]
            _say(
                f"haproxy ({haproxy}) balances {args.balance} over {args.nodes} nodes "
                f"at {fleet.lb_url}"
            )
            notes.append(
                f"traffic through haproxy (balance {args.balance}) over {args.nodes} nodes"
            )
        else:
            base_urls = fleet.node_urls
            why = "--no-haproxy given" if args.no_haproxy else "no haproxy binary found"
            msg = (
                f"{why}: the load generator spreads requests round-robin over the "
                f"{args.nodes} nodes itself"
            )
            _say(msg)
            notes.append(msg)
        cfg = workload_config(args, base_urls, secrets)
        load = (
            f"{cfg.rate:g} req/s Poisson"
            if cfg.rate is not None
            else f"{cfg.concurrency} concurrent"
        )
        notes.append(
            f"workload: {cfg.tenants} tenants (API keys) x {cfg.conversations_per_tenant} "
            f"conversations, system prompts {cfg.system_tokens[0]}-{cfg.system_tokens[1]} "
            f"tokens, up to {cfg.max_turns} turns, {load}, {cfg.duration_s:g} s per run, "
            f"streaming, seed {cfg.seed}"
        )
        notes.append(
            f"{args.backends} backends x {cache_blocks} cache blocks (16 tokens) = "
            f"{args.fleet_cache:g}x the workload's estimated prefix blocks; prefix-cache hit "
            f"rate = hit tokens / queried tokens on the backends over each run"
        )

        reports: list[RunReport] = []
        for n, scenario in enumerate(SCENARIOS, 1):
            label = f"[{n}/{len(SCENARIOS)} {scenario.title}]"
            _say(f"{label} starting {args.nodes} nodes ...")
            await fleet.clear_caches()
            await fleet.start_nodes(scenario)
            before = await fleet.scrape()
            workload = Workload(cfg)
            progress = ProgressLine(label, cfg.duration_s)
            result = await workload.run(progress)
            progress.finish(workload.stats)
            after = await fleet.scrape()
            reports.append(
                build_report(
                    scenario.title,
                    result,
                    deltas(before[0], after[0]),
                    deltas(before[1], after[1]),
                    backends=fleet.backend_ids,
                )
            )
            await fleet.stop_nodes()

        table = render_table(reports, notes)
        if args.json:
            _say(table)
            doc = report_json(
                reports,
                notes,
                scenarios=[s.key for s in SCENARIOS],
                haproxy=haproxy is not None,
                backends=args.backends,
                nodes=args.nodes,
                cache_blocks=cache_blocks,
                workload={
                    "tenants": cfg.tenants,
                    "conversations_per_tenant": cfg.conversations_per_tenant,
                    "max_turns": cfg.max_turns,
                    "system_tokens": list(cfg.system_tokens),
                    "rate": cfg.rate,
                    "concurrency": cfg.concurrency,
                    "duration_s": cfg.duration_s,
                    "seed": cfg.seed,
                    "fleet_cache": args.fleet_cache,
                    "prefill_s_per_token": args.prefill_per_token,
                },
            )
            print(json.dumps(doc, indent=2), file=out, flush=True)
        else:
            print(table, file=out, flush=True)
        errors = sum(r.errors for r in reports)
        if errors:
            _say(f"{errors} request(s) failed")
            return 1
        return 0
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the stack never swallows


async def run_demo(args: argparse.Namespace) -> int:
    """The `demo` command: 0 when every request succeeded, 1 otherwise; 130/143 on a signal."""
    if args.backends < 1 or args.nodes < 1 or args.keys < 1 or args.conversations < 1:
        _say("error: --backends, --nodes, --keys and --conversations must be >= 1")
        return 2
    if args.duration <= 0 or args.rate <= 0 or args.concurrency < 0 or args.fleet_cache <= 0:
        _say("error: --duration, --rate and --fleet-cache must be > 0, --concurrency >= 0")
        return 2
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(sig: signal.Signals) -> None:
        if not received:
            _say(f"\n{sig.name}: stopping everything ...")
        received.append(int(sig))
        task.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        return await _run(args, sys.stdout)
    except asyncio.CancelledError:
        if not received:
            raise
        return 128 + received[0]
    except (DemoError, SupportError) as exc:
        _say(f"error: {exc}")
        return 1
    except (aiohttp.ClientError, OSError, asyncpg.PostgresError) as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def add_demo_parser(subparsers: Any) -> None:
    """Registers `demo` on an argparse subparsers object (`affinity-node demo ...`)."""
    p = subparsers.add_parser(
        "demo",
        help="run a local fleet and compare affinity off / node-local / shared",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backends", type=positive_int, default=4, help="fake vLLM backends (default 4)"
    )
    p.add_argument("--nodes", type=positive_int, default=3, help="proxy nodes (default 3)")
    p.add_argument(
        "--duration",
        type=positive_float,
        default=18.0,
        help="seconds of load per run; three runs (default 18, about a minute)",
    )
    p.add_argument(
        "--keys", type=positive_int, default=40, help="tenants, one API key each (default 40)"
    )
    p.add_argument(
        "--conversations", type=positive_int, default=2, help="conversations per tenant (default 2)"
    )
    p.add_argument(
        "--max-turns",
        type=positive_int,
        default=16,
        help="turns before a conversation starts over (default 16)",
    )
    p.add_argument(
        "--rate", type=positive_float, default=50.0, help="Poisson arrivals per second (default 50)"
    )
    p.add_argument(
        "--concurrency",
        type=non_negative_int,
        default=0,
        help="fixed number of requests in flight instead of --rate",
    )
    p.add_argument("--output-tokens", type=positive_int, default=32, help="tokens per answer")
    p.add_argument(
        "--prefill-per-token",
        type=non_negative_float,
        default=0.0002,
        help="backend seconds per uncached prompt token (default 0.0002)",
    )
    p.add_argument(
        "--fleet-cache",
        type=positive_float,
        default=FLEET_CAPACITY,
        help="all backends' prefix caches together hold this multiple of the "
        f"workload's prefix blocks (default {FLEET_CAPACITY:g})",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--dsn",
        type=dsn_arg,
        default=os.environ.get(DSN_ENV) or None,
        help=f"use this Postgres (default: ${DSN_ENV}, else an embedded one); the "
        "demo's keys are deleted from it at the end",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the JSON report on stdout (the table goes to stderr)",
    )
    p.add_argument(
        "--log-dir",
        metavar="DIR",
        help="keep the child processes' logs here (default: a temporary directory "
        "removed at the end)",
    )
    p.add_argument(
        "--balance",
        choices=["leastconn", "roundrobin"],
        default="leastconn",
        help="HAProxy's balance algorithm over the nodes (default leastconn)",
    )
    p.add_argument(
        "--no-haproxy",
        action="store_true",
        help="no load balancer: the generator spreads requests over the nodes",
    )
    p.set_defaults(func=run_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m affinity_node.sim.demo ...` until the command is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="affinity-node demo", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
