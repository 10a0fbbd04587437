"""`affinity-node demo --scenario agents`: coding-agent sessions (sim/agents.py) three ways.

- affinity off (plain LB): no node at all. Each request goes round-robin straight to the
  backends, as a plain load balancer in front of vLLM sends it, so a follow-up naming
  `previous_response_id` reaches the backend that stores the response only by luck; elsewhere
  it is a 404, a chain failure, and the agent resends its whole conversation. (The nodes
  never do this, even with affinity disabled: a stored response is always routed to its
  owner, so a node-based "affinity off" column would not show what routers without
  owner-aware routing do.)
- shared affinity: the nodes with `affinity.store: postgres`, `max_fanout: 1`.
- shared + fan-out: the same with `max_fanout: 4`: the top tenant's binding grows into a set.

The fleet is the demo's (sim/fleet.py): embedded Postgres, fake backends, 3 nodes restarted
per column, HAProxy in front of them when installed. Each column starts cold (keys of its
own, backends' prefix caches cleared; stored responses of an earlier column are never named).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import aiohttp

from affinity_node.sim.agents import (
    AgentsConfig,
    AgentsWorkload,
    chain_failures,
    live_context_blocks,
)
from affinity_node.sim.fleet import MODEL, BackendModel, Fleet, Scenario, create_keys, delete_keys
from affinity_node.sim.haproxy import find_haproxy
from affinity_node.sim.prefix_cache import BLOCK_SIZE
from affinity_node.sim.render import ProgressLine, render_table, report_json
from affinity_node.sim.report import RunReport, build_report, deltas
from affinity_node.sim.sampler import LoadSampler
from affinity_node.sim.scenarios import PRESETS
from affinity_node.sim.support import Processes, free_port, postgres, scrape_all
from affinity_node.sim.workload import WorkloadResult

SAMPLE_INTERVAL_S = 0.25

Say = Callable[[str], None]


def agents_config(args: argparse.Namespace) -> AgentsConfig:
    """The workload from the demo's options (resolved: every default filled in)."""
    return AgentsConfig(
        base_urls=("http://unused",),
        api_keys=("unused",),
        model=MODEL,
        tenants=args.keys,
        sessions_per_tenant=args.conversations,
        zipf_exponent=args.zipf if args.zipf is not None else 0.0,
        turns_per_chain=args.max_turns,
        instructions_tokens=PRESETS["agents"].system_tokens,
        user_tokens=PRESETS["agents"].user_tokens,
        max_output_tokens=args.output_tokens,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
    )


def cache_blocks_for(cfg: AgentsConfig, backends: int, fleet_capacity: float) -> int:
    """Per backend: `fleet_capacity` x every live chain's context, split over the fleet."""
    return max(64, math.ceil(live_context_blocks(cfg) * fleet_capacity / backends))


def kv_blocks_for(cfg: AgentsConfig, model: BackendModel) -> int:
    """A KV pool that holds every running slot at twice a chain's mean longest context: the
    slots bound the batch, as on a GPU whose KV pool fits its batch; the prefix cache alone
    decides what is reused."""
    longest = cfg.instructions_tokens[1] + cfg.turns_per_chain * cfg.tokens_per_turn()
    return model.max_running * math.ceil(2 * longest / BLOCK_SIZE)


def unexpected_errors(column: Scenario, result: WorkloadResult) -> int:
    """Errors that fail the demo: all of them through the nodes; without a node, chain
    failures are the point of the column and only the others count."""
    errors = result.errors
    if column.direct:
        errors -= chain_failures(result.records)
    return errors


def notes_of(
    cfg: AgentsConfig, args: argparse.Namespace, cache_blocks: int, model: BackendModel
) -> list[str]:
    counts = cfg.session_counts()
    timing = f"{cfg.duration_s:g} s per column"
    if cfg.warmup_s:
        timing = f"{cfg.warmup_s:g} s warm-up (not counted) + {cfg.duration_s:g} s measured"
    return [
        "affinity off (plain LB): no node; requests go round-robin straight to the backends, "
        "as a load balancer without owner-aware routing sends them. A follow-up that misses "
        "the backend storing its previous response gets 404 (a chain failure, counted as an "
        "error) and the agent resends its whole conversation without previous_response_id. "
        "The nodes route a follow-up to the response's owner even with affinity disabled.",
        f"shared columns: {args.nodes} nodes, affinity.store postgres, max_fanout 1 / 4",
        f"workload: {sum(counts)} agent sessions over {cfg.tenants} tenants (Zipf "
        f"{cfg.zipf_exponent:g}: {'/'.join(map(str, counts))}), closed loop with a "
        f"{1000 * cfg.think_s:.0f} ms mean pause; chains of {cfg.turns_per_chain} turns on "
        f"POST /v1/responses (streamed, previous_response_id, instructions "
        f"{cfg.instructions_tokens[0]}-{cfg.instructions_tokens[1]} tokens, 2 tools, "
        f"{100 * cfg.tool_share:.0f}% of user turns call a tool, answered with a "
        f"function_call_output of {cfg.tool_output_tokens[0]}-{cfg.tool_output_tokens[1]} "
        f"tokens); {timing}; seed {cfg.seed}",
        f"{args.backends} backends x {cache_blocks} cache blocks (16 tokens) = "
        f"{args.fleet_cache:g}x every session's longest context; "
        f"{1 / model.prefill_s_per_token:.0f} prefill tokens/s, {model.max_running} running "
        f"slots each; prefix-cache hit rate from the backends' metrics",
        "TTFT per successful request (a resend's own; the 404 before it is not added); "
        f"largest queue: vllm:num_requests_waiting sampled every {SAMPLE_INTERVAL_S:g} s; "
        "fan-out: backends that served at least 5% of a tenant's requests",
    ]


async def run_agents(args: argparse.Namespace, model: BackendModel, out: IO[str], say: Say) -> int:
    """The agents scenario on a fresh fleet; 0 when no request failed unexpectedly."""
    cfg = agents_config(args)
    columns = PRESETS["agents"].columns
    haproxy = None if args.no_haproxy else find_haproxy()
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-demo-")))
        log_dir = Path(args.log_dir) if args.log_dir else tmp
        log_dir.mkdir(parents=True, exist_ok=True)
        from affinity_node.store.migrate import migrate

        if args.dsn is None:
            say("starting an embedded Postgres ...")
        dsn = stack.enter_context(postgres(args.dsn))
        await migrate(dsn)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        procs = Processes(log_dir)
        stack.push_async_callback(procs.close)
        fleet = Fleet(
            procs, session, tmp, dsn,
            backend_ports=[free_port() for _ in range(args.backends)],
            node_ports=[free_port() for _ in range(args.nodes)],
            node_log_level="INFO" if args.log_dir else "WARNING",
        )  # fmt: skip
        cache_blocks = cache_blocks_for(cfg, args.backends, args.fleet_cache)
        say(f"starting {args.backends} fake backends (prefix cache {cache_blocks} blocks each) ...")
        await fleet.start_backends(
            cache_blocks, model, args.output_tokens, args.seed, kv_blocks_for(cfg, model)
        )
        node_urls = fleet.node_urls
        if haproxy is not None:
            await fleet.start_haproxy(haproxy, args.balance)
            assert fleet.lb_url is not None
            node_urls = [fleet.lb_url]
        notes = notes_of(cfg, args, cache_blocks, model)
        notes.insert(
            2,
            f"traffic through haproxy (balance {args.balance}) over {args.nodes} nodes"
            if haproxy is not None
            else "no haproxy: the load generator spreads turns round-robin over the nodes",
        )
        run_id = uuid.uuid4().hex[:8]
        reports: list[RunReport] = []
        failed = 0
        for n, column in enumerate(columns, 1):
            label = f"[{n}/{len(columns)} {column.title}]"
            key_ids, secrets = await create_keys(dsn, cfg.tenants, f"demo-{run_id}-{column.key}")
            if args.dsn is not None:
                stack.push_async_callback(delete_keys, dsn, key_ids)
            await fleet.clear_caches()
            urls = fleet.backend_urls
            if not column.direct:
                say(f"{label} starting {args.nodes} nodes ...")
                await fleet.start_nodes(column)
                urls = node_urls
            run_cfg = replace(cfg, base_urls=tuple(urls), api_keys=tuple(secrets))
            report, result = await _column(fleet, column, run_cfg, label)
            failed += unexpected_errors(column, result)
            reports.append(report)
            await fleet.stop_nodes()
            await delete_keys(dsn, key_ids)

        table = render_table(reports, notes)
        if args.json:
            say(table)
            doc = _json(reports, notes, cfg, args, haproxy is not None, cache_blocks, model)
            doc["ok"] = failed == 0  # chain failures without a node are expected
            print(json.dumps(doc, indent=2), file=out, flush=True)
        else:
            print(table, file=out, flush=True)
        if failed:
            say(f"{failed} request(s) failed")
            return 1
        return 0
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the stack never swallows


async def _column(
    fleet: Fleet, column: Scenario, cfg: AgentsConfig, label: str
) -> tuple[RunReport, WorkloadResult]:
    backends = dict(zip(fleet.backend_ids, fleet.backend_urls, strict=True))
    metrics = {b: f"{u}/metrics" for b, u in backends.items()}
    nodes = {} if column.direct else {
        f"node-{i}": f"{u}/metrics" for i, u in enumerate(fleet.node_urls)
    }  # fmt: skip
    workload = AgentsWorkload(cfg)
    sampler = LoadSampler(fleet.session, metrics, SAMPLE_INTERVAL_S)

    async def scrape() -> tuple[dict[str, Any], dict[str, Any]]:
        return await scrape_all(fleet.session, metrics), await scrape_all(fleet.session, nodes)

    before = await scrape()

    async def measure_from_here() -> None:
        nonlocal before
        sampler.reset()
        before = await scrape()

    progress = ProgressLine(label, cfg.warmup_s + cfg.duration_s)
    async with sampler:
        result = await workload.run(progress, measure_from_here if cfg.warmup_s else None)
    progress.finish(workload.stats)
    after = await scrape()
    report = build_report(
        column.title,
        result,
        deltas(before[0], after[0]),
        deltas(before[1], after[1]) if nodes else None,
        backends=fleet.backend_ids,
        max_waiting=sampler.max_waiting,
    )
    report.chain_failures = chain_failures(result.measured)
    return report, result


def _json(
    reports: Sequence[RunReport],
    notes: Sequence[str],
    cfg: AgentsConfig,
    args: argparse.Namespace,
    haproxy: bool,
    cache_blocks: int,
    model: BackendModel,
) -> dict[str, Any]:
    return report_json(
        reports,
        notes,
        scenario="agents",
        scenarios=[c.key for c in PRESETS["agents"].columns],
        haproxy=haproxy,
        backends=args.backends,
        nodes=args.nodes,
        cache_blocks=cache_blocks,
        workload={
            "tenants": cfg.tenants,
            "sessions": cfg.session_counts(),
            "turns_per_chain": cfg.turns_per_chain,
            "instructions_tokens": list(cfg.instructions_tokens),
            "zipf_exponent": cfg.zipf_exponent,
            "duration_s": cfg.duration_s,
            "warmup_s": cfg.warmup_s,
            "seed": cfg.seed,
            "fleet_cache": args.fleet_cache,
        },
        backend_model={
            "prefill_s_per_token": model.prefill_s_per_token,
            "ttft_base_s": model.ttft_base_s,
            "tokens_per_s": model.tokens_per_s,
            "decode_slowdown": model.decode_slowdown,
            "max_running": model.max_running,
        },
    )
