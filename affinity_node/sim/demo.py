"""`affinity-node demo`: a whole fleet on one machine, the same workload three ways.

Starts Postgres (embedded unless `--dsn`), N fake vLLM backends, M proxy nodes and HAProxy in
front of them when the binary exists, then runs one multi-tenant chat workload three times,
once per column of the chosen scenario (sim/scenarios.py):

- `--scenario chat` (the default): affinity off (every request to the least busy backend, what
  a plain balancer does); node-local affinity (`affinity.store: memory`: each node pins pairs
  on its own, as routers without shared state do, so a tenant's prefixes are spread and
  duplicated over several caches); shared affinity (`affinity.store: postgres`: one binding
  per pair for every node).
- `--scenario skew`: Zipf tenant popularity, the top tenant needing more than one backend;
  affinity off, shared affinity with `max_fanout: 1` (one backend per pair) and shared
  affinity with `max_fanout: 4` (a hot pair's binding may grow into a set of backends).
- `--scenario agents`: coding-agent sessions on the Responses API (sim/agents_demo.py): a
  plain round-robin balancer with no node, shared affinity, shared affinity with fan-out.
- `--scenario db-failover`: a Postgres primary and its streaming standby, the nodes on a
  multi-host DSN; the primary crashes under traffic, the standby is promoted
  (sim/db_failover.py): requests, errors and degraded share per phase, time to converge.

Between runs the nodes restart with the next config, the backends' prefix caches are cleared
and each run gets API keys of its own (no binding survives from an earlier run), so each run
starts cold; figures are deltas over the run (over its measured part after a warm-up). The
backends' caches are sized like a real fleet's: none can hold every tenant's prefixes, all
together can. A sampler reads every backend's queue four times a second.

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
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import replace
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
from affinity_node.sim import scale
from affinity_node.sim.agents_demo import run_agents
from affinity_node.sim.db_failover import run_db_failover
from affinity_node.sim.fleet import MODEL, BackendModel, Fleet, create_keys, delete_keys
from affinity_node.sim.haproxy import find_haproxy
from affinity_node.sim.ledger_view import read_ledger_tenants
from affinity_node.sim.noisy import run_noisy
from affinity_node.sim.render import ProgressLine, render_table, report_json
from affinity_node.sim.report import FANOUT_MIN_SHARE, RunReport, build_report, deltas
from affinity_node.sim.sampler import LoadSampler
from affinity_node.sim.scenarios import (
    PRESETS,
    SCENARIO_NAMES,
    Preset,
    backend_capacity_rps,
    backends_of_load,
)
from affinity_node.sim.support import Processes, SupportError, free_port, postgres
from affinity_node.sim.workload import Workload, WorkloadConfig, estimate_working_set_blocks

DSN_ENV = "AFFINITY_DATABASE_DSN"
FLEET_CAPACITY = 1.2
"""All backends' caches together hold this many times the workload's prefix blocks; each
holds FLEET_CAPACITY / N of it (0.3 with 4 backends): a pinned tenant fits, every tenant
on every backend does not."""
SAMPLE_INTERVAL_S = 0.25


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (with the failing process's log tail)."""


# -- the demo --------------------------------------------------------------------------------


def preset_of(args: argparse.Namespace) -> Preset:
    return PRESETS[args.scenario]


LLAMACPP_DEFAULTS: dict[str, Any] = {
    "keys": 12,
    "conversations": 1,
    "max_turns": 5,
    "output_tokens": 8,
    "duration": 20.0,
    "rate": 4.0,
}
"""`--engine llamacpp`: real compute on this machine's CPUs (one thread per engine), so a
lighter load than the simulator's: ~1,000-token system prompts at 4 req/s keep the engines
busy but not saturated with affinity, and every conversation within the 4,096-token context."""
LLAMACPP_SKEW_DEFAULTS: dict[str, Any] = {
    "keys": 8,
    "conversations": 6,
    "max_turns": 3,
    "output_tokens": 8,
    "duration": 30.0,
    "warmup": 10.0,
    "rate": 4.0,
}
"""`--scenario skew --engine llamacpp`: Zipf 2.0 over 8 tenants at 4 req/s puts ~2.6 req/s on
the top tenant, about what its one engine (one slot, one thread, ~1,000-token prompts) serves
from its cache. At 6 req/s this 2-core machine (4 engines, 3 nodes, HAProxy, Postgres and the
load generator) keeps up neither without affinity nor with it at fan-out 1 or 4."""
LLAMACPP_CACHE_MIB: dict[str, int] = {"skew": 4}
"""Each engine's prompt cache beyond its slot, per scenario (else llama.cpp's default, which
holds every tenant of these workloads). The tiny model's KV takes ~2 KB a token: 4 MiB keeps
about two ~1,000-token prompts, so the fleet holds the working set about once, as the
simulator's skew fleet does, and where a tenant's requests go matters."""
LLAMACPP_SCENARIO_DEFAULTS: dict[str, dict[str, Any]] = {
    "chat": LLAMACPP_DEFAULTS,
    "skew": LLAMACPP_SKEW_DEFAULTS,
}
"""The scenarios `--engine llamacpp` runs, with their lighter defaults."""
LLAMACPP_SYSTEM_WORDS = (250, 400)
LLAMACPP_USER_WORDS = (8, 20)
"""The workload's words per system prompt and per question (the tiny model's tokenizer makes
~3 tokens of each)."""


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills every option left unset with the scenario's default (a copy)."""
    p = preset_of(args)
    out = argparse.Namespace(**vars(args))
    if getattr(out, "engine", "sim") == "llamacpp":
        for name, value in LLAMACPP_SCENARIO_DEFAULTS.get(args.scenario, {}).items():
            if getattr(out, name, None) is None:
                setattr(out, name, value)
    defaults: dict[str, Any] = {
        "keys": p.keys,
        "conversations": p.conversations,
        "max_turns": p.max_turns,
        "output_tokens": p.output_tokens,
        "duration": p.duration_s,
        "warmup": p.warmup_s,
        "load": p.load,
        "zipf": p.zipf,
        "prefill_per_token": p.backend.prefill_s_per_token,
        "ttft_base": p.backend.ttft_base_s,
        "tokens_per_s": p.backend.tokens_per_s,
        "decode_slowdown": p.backend.decode_slowdown,
        "max_running": p.backend.max_running,
    }
    for name, value in defaults.items():
        if getattr(out, name, None) is None:
            setattr(out, name, value)
    if out.rate is None and not out.concurrency:
        out.rate = p.rate  # None for skew: derived from --load once the model is known
    return out


def backend_model(args: argparse.Namespace) -> BackendModel:
    return BackendModel(
        prefill_s_per_token=args.prefill_per_token,
        ttft_base_s=args.ttft_base,
        tokens_per_s=args.tokens_per_s,
        decode_slowdown=args.decode_slowdown,
        max_running=args.max_running,
    )


def workload_config(
    args: argparse.Namespace, base_urls: Sequence[str], secrets: Sequence[str]
) -> WorkloadConfig:
    p = preset_of(args)
    rate = None if args.concurrency else (args.rate or 1.0)
    if getattr(args, "engine", "sim") == "llamacpp":
        p = replace(p, system_tokens=LLAMACPP_SYSTEM_WORDS, user_tokens=LLAMACPP_USER_WORDS)
    return WorkloadConfig(
        base_urls=tuple(base_urls),
        api_keys=tuple(secrets),
        models=(MODEL,),
        tenants=args.keys,
        conversations_per_tenant=args.conversations,
        max_turns=args.max_turns,
        system_tokens=p.system_tokens,
        user_tokens=p.user_tokens,
        max_tokens=args.output_tokens,
        rate=rate,
        concurrency=args.concurrency or None,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        spread="round_robin",
        zipf_exponent=args.zipf,
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


def _load_notes(
    args: argparse.Namespace, cfg: WorkloadConfig, model: BackendModel, cache_blocks: int
) -> tuple[float | None, list[str]]:
    """The open-loop rate (derived from --load when --rate is not given) and what to say."""
    if cfg.rate is None:
        return None, []
    capacity = backend_capacity_rps(model.capacity(cache_blocks), cfg)
    rate = args.rate if args.rate is not None else args.load * args.backends * capacity
    notes = [
        f"capacity model: {1 / model.prefill_s_per_token:.0f} prefill tokens/s shared by the "
        f"requests prefilling at once, {model.max_running} running slots then a FIFO queue, "
        f"decode {model.tokens_per_s:g} tokens/s alone, {model.decode_slowdown:g} slower per "
        f"other running request; one backend sustains ~{capacity:.1f} req/s of this workload "
        f"with affinity (estimated prefill per request), so {rate:.1f} req/s is "
        f"{rate / (args.backends * capacity):.0%} of the fleet's capacity"
    ]
    if cfg.zipf_exponent is not None:
        shares = cfg.popularity()
        top = ", ".join(
            f"t{i} {100 * s:.0f}% ({backends_of_load(s, rate, capacity):.2f} backends)"
            for i, s in enumerate(shares[:3])
        )
        notes.append(f"Zipf {cfg.zipf_exponent:g} over {cfg.tenants} tenants: {top}")
    return rate, notes


def _cache_words(mib: int) -> str:
    return "llama.cpp's default" if mib < 0 else f"{mib} MiB"


async def _start_llamacpp(
    fleet: Fleet, tmp: Path, args: argparse.Namespace, notes: list[str]
) -> None:
    from affinity_node.sim.llamacpp import TinyModel, make_tiny_model

    shape = TinyModel()
    _say(f"making the tiny model, starting {args.backends} llama.cpp servers ...")
    path = await asyncio.to_thread(make_tiny_model, tmp / "tiny.gguf")
    await fleet.start_llamacpp(path, LLAMACPP_CACHE_MIB.get(args.scenario, -1))
    notes.append(
        f"engines: {args.backends} real llama.cpp servers (xllamacpp), one slot and one thread "
        f"each, a random-weight llama ({shape.layers} layers, embedding {shape.embedding}, "
        f"vocab {shape.vocab}, context {shape.context}), prompt cache beyond the slot "
        f"{_cache_words(fleet.engine_cache_mib)}, restarted before each run; hit rate "
        "and prefill saved from the engines' own /metrics (llamacpp:prompt_tokens_total, "
        "_cached_total, prompt_seconds_total): saved = cached tokens x the engines' measured "
        "seconds per computed prompt token; nodes run them as `kind: llamacpp` (load polled "
        "from llamacpp:requests_processing and _deferred); x-backend-id comes from a small "
        "relay in each engine's process (llama.cpp sends none)"
    )


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    args = resolve(args)
    if args.scenario == "agents":
        return await run_agents(args, backend_model(args), out, _say)
    if args.scenario == "db-failover":
        return await run_db_failover(args, out, _say)
    if args.scenario == "noisy":
        return await run_noisy(args, out, _say)
    preset = preset_of(args)
    columns = preset.columns
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

        model = backend_model(args)
        probe = workload_config(args, ["http://unused"], ["unused"])
        # The KV pool does not bound this workload's capacity: any size will do here.
        rate, load_notes = _load_notes(args, probe, model, cache_blocks=10**6)
        if rate is not None:
            probe = replace(probe, rate=rate)
        span = args.duration + args.warmup
        expected = (
            round(rate * span) if rate is not None else args.concurrency * 20 * math.ceil(span)
        )
        cache_blocks = cache_blocks_for(probe, args.backends, expected, args.fleet_cache)
        if args.engine == "llamacpp":
            await _start_llamacpp(fleet, tmp, args, notes)
        else:
            _say(
                f"starting {args.backends} fake backends (prefix cache {cache_blocks} blocks "
                f"each, prefill {args.prefill_per_token * 1000:.2f} ms per uncached token, "
                f"{args.max_running} running slots) ..."
            )
            await fleet.start_backends(cache_blocks, model, args.output_tokens, args.seed)
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
        cfg = replace(probe, base_urls=tuple(base_urls))
        load = (
            f"{cfg.rate:.1f} req/s Poisson"
            if cfg.rate is not None
            else f"{cfg.concurrency} concurrent"
        )
        popularity = "equally busy" if cfg.zipf_exponent is None else f"Zipf {cfg.zipf_exponent:g}"
        timing = f"{cfg.duration_s:g} s per run"
        if cfg.warmup_s:
            timing = f"{cfg.warmup_s:g} s warm-up (not counted) + {cfg.duration_s:g} s measured"
        notes.append(
            f"workload: {cfg.tenants} tenants (API keys, {popularity}) x "
            f"{cfg.conversations_per_tenant} conversations"
            + (" on average" if cfg.zipf_exponent is not None else "")
            + f", system prompts {cfg.system_tokens[0]}-{cfg.system_tokens[1]} tokens, up to "
            f"{cfg.max_turns} turns, {load}, {timing}, streaming, seed {cfg.seed}"
        )
        if args.engine == "sim":  # the simulator's capacity model says nothing of llama.cpp
            notes.extend(load_notes)
        if args.engine == "sim":
            notes.append(
                f"{args.backends} backends x {cache_blocks} cache blocks (16 tokens) = "
                f"{args.fleet_cache:g}x the workload's estimated prefix blocks; prefix-cache hit "
                f"rate = hit tokens / queried tokens on the backends over each run"
            )
        notes.append(
            f"largest queue: the most vllm:num_requests_waiting (llamacpp:requests_deferred) "
            f"seen on each backend, sampled every {SAMPLE_INTERVAL_S:g} s; busiest tenants "
            f"from the answers' x-backend-id: share of a tenant's requests on its most-used "
            f"backend / fan-out = backends that served at least {FANOUT_MIN_SHARE:.0%} of them"
        )
        notes.append(
            "ledger tenants: the 5 tenants with the most requests in the nodes' usage ledger "
            "(`affinity-node usage`, warm-up included): hit rate from the answers' cached "
            "tokens, on how many backends"
        )

        reports: list[RunReport] = []
        scale_runs: list[tuple[str, list[scale.PhaseFigures], float | None]] = []
        facts = scale.ScaleFacts()
        added_ratio: float | None = None
        failed = 0
        backend_metrics = {
            b: f"{u}/metrics" for b, u in zip(fleet.backend_ids, fleet.backend_urls, strict=True)
        }
        for n, column in enumerate(columns, 1):
            label = f"[{n}/{len(columns)} {column.title}]"
            key_ids, secrets = await create_keys(dsn, cfg.tenants, f"demo-{run_id}-{column.key}")
            if args.dsn is not None:
                stack.push_async_callback(delete_keys, dsn, key_ids)
            _say(f"{label} starting {args.nodes} nodes ...")
            await fleet.clear_caches()
            await fleet.start_nodes(column)
            workload = Workload(replace(cfg, api_keys=tuple(secrets)))
            sampler = LoadSampler(session, backend_metrics, SAMPLE_INTERVAL_S)
            before = await fleet.scrape()

            async def measure_from_here(
                sampler: LoadSampler = sampler,
            ) -> None:
                nonlocal before
                sampler.reset()
                before = await fleet.scrape()

            progress = ProgressLine(label, cfg.warmup_s + cfg.duration_s)
            events: asyncio.Task[scale.ScaleFacts] | None = None
            measuring: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            if preset.name == "scale" and column.key == "scale":
                events = asyncio.create_task(scale.run_events(
                    session, dsn, fleet.backend_urls, cfg.duration_s, measuring, _say,
                ))  # fmt: skip

            async def measure_and_mark(
                measuring: asyncio.Future[float] = measuring,
                measure_from_here: Callable[[], Awaitable[None]] = measure_from_here,
            ) -> None:
                measuring.set_result(time.monotonic())
                await measure_from_here()

            try:
                async with sampler:
                    result = await workload.run(
                        progress,
                        on_measure=measure_and_mark if cfg.warmup_s or events else None,
                    )
            except BaseException:
                if events is not None:
                    events.cancel()
                raise
            progress.finish(workload.stats)
            if preset.name == "scale":
                third = cfg.duration_s / 3
                bounds = [0.0, third, 2 * third, cfg.duration_s + 1]
                phases = scale.phase_figures(
                    result.records, bounds, fleet.backend_ids, cfg.warmup_s
                )
                if events is not None:
                    facts = await events
                    added_ratio = scale.added_share(
                        result.records, fleet.backend_ids[-1],
                        max(third, 2 * third - scale.SHARE_WINDOW_S), 2 * third, cfg.warmup_s,
                    )  # fmt: skip
                    await scale.reset_registry(dsn, fleet.backend_urls)
            after = await fleet.scrape()
            failed += result.errors
            report = build_report(
                column.title,
                result,
                deltas(before[0], after[0]),
                deltas(before[1], after[1]),
                backends=fleet.backend_ids,
                max_waiting=sampler.max_waiting,
            )
            reports.append(report)
            if preset.name == "scale":
                overall = report.cache.hit_rate if report.cache is not None else None
                scale_runs.append((column.title, phases, overall))
            await fleet.stop_nodes()  # each node flushes its usage ledger as it stops
            report.ledger = await read_ledger_tenants(dsn, key_ids)
            # The next run starts from an empty binding table: this run's bindings (the
            # keys' cascade) would otherwise weigh on placement, rebalance and drain there.
            await delete_keys(dsn, key_ids)

        table = render_table(reports, notes)
        if preset.name == "scale":
            table = scale.render(
                scale_runs, facts, fleet.backend_ids[-1], added_ratio, notes, cfg.duration_s / 3
            )
        if args.json:
            _say(table)
            doc = report_json(
                reports,
                notes,
                scenario=args.scenario,
                scenarios=[c.key for c in columns],
                haproxy=haproxy is not None,
                **(
                    {"scale": scale.to_json(scale_runs, facts, added_ratio)}
                    if preset.name == "scale"
                    else {}
                ),
                backends=args.backends,
                nodes=args.nodes,
                cache_blocks=cache_blocks,
                workload={
                    "tenants": cfg.tenants,
                    "conversations_per_tenant": cfg.conversations_per_tenant,
                    "max_turns": cfg.max_turns,
                    "system_tokens": list(cfg.system_tokens),
                    "zipf_exponent": cfg.zipf_exponent,
                    "rate": cfg.rate,
                    "concurrency": cfg.concurrency,
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
            print(json.dumps(doc, indent=2), file=out, flush=True)
        else:
            print(table, file=out, flush=True)
        if failed:
            _say(f"{failed} request(s) failed")
            return 1
        return 0
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the stack never swallows


def invalid(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or None."""
    r = resolve(args)
    if args.scenario == "agents" and (
        args.rate is not None or args.load is not None or args.concurrency
    ):
        return (
            "--scenario agents runs closed-loop agent sessions: no --rate, --load or --concurrency"
        )
    if getattr(args, "engine", "sim") == "llamacpp" and args.scenario not in (
        LLAMACPP_SCENARIO_DEFAULTS
    ):
        return f"--engine llamacpp runs the {' and '.join(LLAMACPP_SCENARIO_DEFAULTS)} scenarios"
    if args.scenario == "scale" and r.backends < 2:
        return "--scenario scale needs --backends >= 2 (one joins at runtime, one drains)"
    if r.backends < 1 or r.nodes < 1 or r.keys < 1 or r.conversations < 1 or r.max_turns < 1:
        return "--backends, --nodes, --keys, --conversations and --max-turns must be >= 1"
    if r.duration <= 0 or r.concurrency < 0 or r.fleet_cache <= 0 or r.warmup < 0:
        return "--duration and --fleet-cache must be > 0, --warmup and --concurrency >= 0"
    agents = args.scenario == "agents"
    if not (r.concurrency or agents) and (r.rate or 0) <= 0 and (r.rate is not None or r.load <= 0):
        return "--rate and --load must be > 0"
    if r.zipf is not None and r.zipf < 0:
        return "--zipf must be >= 0"
    if r.prefill_per_token < 0 or r.ttft_base < 0 or r.decode_slowdown < 0:
        return "--prefill-per-token, --ttft-base and --decode-slowdown must be >= 0"
    if r.tokens_per_s <= 0 or r.max_running < 1 or r.output_tokens < 1:
        return "--tokens-per-s must be > 0, --max-running and --output-tokens >= 1"
    return None


async def run_demo(args: argparse.Namespace) -> int:
    """The `demo` command: 0 when every request succeeded, 1 otherwise; 130/143 on a signal."""
    problem = invalid(args)
    if problem is not None:
        _say(f"error: {problem}")
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
        help="run a local fleet and compare routing side by side "
        "(--scenario chat|skew|scale|agents)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    configure_parser(p)


def _both(name: str, fmt: str = "{}") -> str:
    """ "(chat: X, skew: Y)": a scenario-dependent default for --help."""
    values = []
    for preset in PRESETS.values():
        value = getattr(preset, name) if hasattr(preset, name) else getattr(preset.backend, name)
        values.append(f"{preset.name}: " + ("-" if value is None else fmt.format(value)))
    return "(" + ", ".join(values) + ")"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scenario",
        choices=SCENARIO_NAMES,
        default="chat",
        help="chat (default): 40 equally busy tenants, affinity off / node-local / shared; "
        "skew: Zipf tenants, one needing more than a backend, affinity off / max_fanout 1 "
        "/ max_fanout 4; scale: 3 backends, a 4th added, one drained, against the same run "
        "without these events; agents: coding-agent sessions on the Responses API (chained "
        "by previous_response_id), a plain round-robin LB / shared / shared + fan-out; "
        "db-failover: a Postgres primary crashes under traffic and its standby is promoted "
        "(3 nodes on a multi-host DSN): requests, errors, degraded share, time to converge",
    )
    p.add_argument(
        "--engine",
        choices=["sim", "llamacpp"],
        default="sim",
        help="sim (default): simulated vLLM backends; llamacpp: real llama.cpp servers on a "
        "tiny random-weight model (needs the xllamacpp and gguf packages; chat and skew "
        "scenarios, lighter default loads)",
    )
    p.add_argument(
        "--backends", type=positive_int, default=4, help="fake vLLM backends (default 4)"
    )
    p.add_argument("--nodes", type=positive_int, default=3, help="proxy nodes (default 3)")
    p.add_argument(
        "--duration",
        type=positive_float,
        default=None,
        help="measured seconds of load per run; three runs " + _both("duration_s", "{:g}"),
    )
    p.add_argument(
        "--warmup",
        type=non_negative_float,
        default=None,
        help="seconds of the same load before each measured part, not counted "
        + _both("warmup_s", "{:g}"),
    )
    p.add_argument(
        "--keys", type=positive_int, default=None, help="tenants, one API key each " + _both("keys")
    )
    p.add_argument(
        "--conversations",
        type=positive_int,
        default=None,
        help="conversations per tenant (with --zipf: on average, by popularity) "
        + _both("conversations"),
    )
    p.add_argument(
        "--max-turns",
        type=positive_int,
        default=None,
        help="turns before a conversation starts over " + _both("max_turns"),
    )
    p.add_argument(
        "--zipf",
        type=non_negative_float,
        default=None,
        help="Zipf exponent of tenant popularity (tenant i draws 1/(i+1)^s of the "
        "arrivals; 0 = uniform) " + _both("zipf", "{:g}"),
    )
    p.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="Poisson arrivals per second " + _both("rate", "{:g}") + "; skew derives it "
        "from --load",
    )
    p.add_argument(
        "--load",
        type=positive_float,
        default=None,
        help="without --rate: arrivals at this fraction of the fleet's capacity, estimated "
        "from the backend model " + _both("load", "{:g}"),
    )
    p.add_argument(
        "--concurrency",
        type=non_negative_int,
        default=0,
        help="fixed number of requests in flight instead of --rate",
    )
    p.add_argument(
        "--output-tokens",
        type=positive_int,
        default=None,
        help="tokens per answer " + _both("output_tokens"),
    )
    p.add_argument(
        "--prefill-per-token",
        type=non_negative_float,
        default=None,
        help="backend prefill compute per uncached prompt token, shared by the requests "
        "prefilling at once " + _both("prefill_s_per_token", "{:g}"),
    )
    p.add_argument(
        "--ttft-base",
        type=non_negative_float,
        default=None,
        help="backend seconds to a first token besides the prefill " + _both("ttft_base_s", "{:g}"),
    )
    p.add_argument(
        "--tokens-per-s",
        type=positive_float,
        default=None,
        help="backend output tokens/s of a request decoding alone " + _both("tokens_per_s", "{:g}"),
    )
    p.add_argument(
        "--decode-slowdown",
        type=non_negative_float,
        default=None,
        help="each other running request makes a decode step this much longer "
        + _both("decode_slowdown", "{:g}"),
    )
    p.add_argument(
        "--max-running",
        type=positive_int,
        default=None,
        help="backend running slots; more requests wait FIFO " + _both("max_running"),
    )
    p.add_argument(
        "--fleet-cache",
        type=positive_float,
        default=FLEET_CAPACITY,
        help="all backends' prefix caches together hold this multiple of the "
        f"workload's prefix blocks (default {FLEET_CAPACITY:g})",
    )
    p.add_argument("--seed", type=non_negative_int, default=1)
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
