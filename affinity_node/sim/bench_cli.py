"""`affinity-node bench`: the demo's multi-tenant chat workload against any deployment.

Point it at a load balancer (or at several nodes: requests are spread over every `--url`)
and give it API keys. Bindings are per API key, so K simulated tenants need K keys
(`--api-key` repeated or `--api-keys-file`, one per line); with fewer keys, tenants share
them and affinity sees fewer tenants (the report says so). `--zipf S` gives the tenants a
Zipf popularity (the skew demo's shape: a hot tenant with many conversations), `--warmup`
a load period left out of the figures. Figures come from the client (TTFT p50/p90/p99,
latency, requests per backend from `x-backend-id`, the busiest tenants' spread over
backends, `x-affinity` counts, and the prefix-cache hit rate from
`usage.prompt_tokens_details.cached_tokens` when the backends report it); add
`--backend-metrics` (vLLM /metrics) for the backends' own hit rate and their largest
queues, and `--node-metrics` (node /metrics) for affinity hits, misses, rebinds and spills.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from affinity_node.argtypes import (
    http_url,
    non_empty,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from affinity_node.sim.render import ProgressLine, render_table, report_json
from affinity_node.sim.report import build_report, deltas
from affinity_node.sim.sampler import LoadSampler
from affinity_node.sim.support import scrape_all
from affinity_node.sim.workload import Workload, WorkloadConfig

DEFAULT_TENANTS = 32
DEFAULT_RATE = 20.0
API_KEY_ENV = "AFFINITY_API_KEY"
"""Keys (separated by commas or spaces) used when none is given on the command line."""


class BenchError(RuntimeError):
    """Bad arguments or an unreachable metrics endpoint; the message says which."""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_keys(args: argparse.Namespace) -> list[str]:
    keys = [k.strip() for k in (args.api_key or []) if k.strip()]
    if args.api_keys_file:
        try:
            text = Path(args.api_keys_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"cannot read {args.api_keys_file}: {exc.strerror}") from None
        keys += [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not keys:
        keys = os.environ.get(API_KEY_ENV, "").replace(",", " ").split()
    if not keys:
        raise BenchError(
            "no API key: pass --api-key KEY (repeatable), --api-keys-file FILE "
            f"or set {API_KEY_ENV}"
        )
    return keys


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")


def metrics_targets(specs: Sequence[str], kind: str) -> dict[str, str]:
    """`NAME=URL` or `URL` (named after its host:port) -> {name: URL}; /metrics is added."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or name.startswith(("http:", "https:")):
            name, url = "", spec
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BenchError(f"--{kind}-metrics {spec!r}: expected [NAME=]http://host:port")
        if not parts.path.rstrip("/"):
            url = url.rstrip("/") + "/metrics"
        out[name or parts.netloc] = url
    return out


def workload_from_args(args: argparse.Namespace, keys: Sequence[str]) -> WorkloadConfig:
    tenants = args.keys or (len(keys) if len(keys) > 1 else DEFAULT_TENANTS)
    return WorkloadConfig(
        base_urls=tuple(u.rstrip("/") for u in args.url),
        api_keys=tuple(keys),
        models=tuple(args.model or ["llama-3.1-8b"]),
        tenants=tenants,
        conversations_per_tenant=args.conversations,
        max_turns=args.max_turns,
        max_tokens=args.max_tokens,
        # --concurrency alone: a closed loop; with --rate too: Poisson arrivals with at most
        # that many requests in flight (the others are skipped and counted).
        rate=None if args.concurrency and args.rate is None else (args.rate or DEFAULT_RATE),
        concurrency=args.concurrency if args.concurrency and args.rate is None else None,
        max_inflight=args.concurrency if args.concurrency and args.rate is not None else 512,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        stream=args.stream,
        seed=args.seed,
        spread=args.spread,
        request_timeout_s=args.timeout,
        zipf_exponent=args.zipf,
        conversation_key=args.conversation_key,
    )


async def run_bench(args: argparse.Namespace) -> int:
    """The `bench` command: 0 when every request succeeded, 1 if any failed, 2 on bad input."""
    try:
        keys = read_keys(args)
        backends = metrics_targets(args.backend_metrics or [], "backend")
        nodes = metrics_targets(args.node_metrics or [], "node")
        cfg = workload_from_args(args, keys)
    except (BenchError, ValueError) as exc:
        _say(f"error: {exc}")
        return 2
    notes = []
    if len(keys) == 1:
        notes.append(
            f"one API key for all {cfg.tenants} tenants: bindings are per key, so "
            "affinity sees a single tenant (pass one key per tenant to simulate "
            "several)"
        )
    elif len(keys) < cfg.tenants:
        notes.append(
            f"{cfg.tenants} tenants share {len(keys)} API keys: affinity sees {len(keys)} tenants"
        )
    load = (
        f"{cfg.concurrency} concurrent"
        if cfg.rate is None
        else f"{cfg.rate:g} req/s Poisson"
        + (f" (at most {cfg.max_inflight} in flight)" if args.concurrency else "")
    )
    where = (
        cfg.base_urls[0] if len(cfg.base_urls) == 1 else f"{len(cfg.base_urls)} URLs ({cfg.spread})"
    )
    popularity = "" if cfg.zipf_exponent is None else f" (Zipf {cfg.zipf_exponent:g})"
    timing = f"{cfg.duration_s:g} s"
    if cfg.warmup_s:
        timing = f"{cfg.warmup_s:g} s warm-up (not counted) + {timing}"
    notes.append(
        f"workload: {cfg.tenants} tenants{popularity} x {cfg.conversations_per_tenant} "
        f"conversations, up to {cfg.max_turns} turns, {load}, {timing}, "
        f"{'streaming' if cfg.stream else 'non-streaming'}, seed {cfg.seed}, "
        f"against {where}"
    )
    if not backends:
        notes.append(
            "no --backend-metrics: the prefix-cache hit rate (if shown) comes from "
            "the answers' usage.prompt_tokens_details.cached_tokens"
        )
    for note in notes:
        _say(note)

    async with aiohttp.ClientSession() as session:
        try:
            before_b = await scrape_all(session, backends)
            before_n = await scrape_all(session, nodes)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            _say(f"error: cannot read a metrics endpoint: {type(exc).__name__}: {exc}")
            return 2
        workload = Workload(cfg)
        sampler = LoadSampler(session, backends)

        async def measure_from_here() -> None:
            nonlocal before_b, before_n
            sampler.reset()
            before_b = await scrape_all(session, backends)
            before_n = await scrape_all(session, nodes)

        progress = ProgressLine("[bench]", cfg.warmup_s + cfg.duration_s)
        async with sampler:
            result = await workload.run(
                progress, on_measure=measure_from_here if cfg.warmup_s else None
            )
        progress.finish(workload.stats)
        try:
            after_b = await scrape_all(session, backends)
            after_n = await scrape_all(session, nodes)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            _say(
                f"warning: metrics unreadable after the run ({type(exc).__name__}); "
                "showing client figures only"
            )
            after_b, after_n, backends, nodes = {}, {}, {}, {}

    report = build_report(
        "bench",
        result,
        deltas(before_b, after_b) if backends else None,
        deltas(before_n, after_n) if nodes else None,
        backends=list(backends) if backends else (),
        max_waiting=sampler.max_waiting if backends else None,
    )
    table = render_table([report], notes)
    if args.json == "-":
        _say(table)  # stdout carries the JSON alone
    else:
        print(table, flush=True)
    if args.json:
        doc: dict[str, Any] = report_json([report], notes)
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text, flush=True)
        else:
            write_text(args.json, text + "\n")
    if result.errors:
        _say(f"{result.errors} request(s) failed")
        return 1
    return 0


def add_bench_parser(subparsers: Any) -> None:
    """Registers `bench` on an argparse subparsers object (`affinity-node bench ...`)."""
    p = subparsers.add_parser(
        "bench",
        help="multi-tenant chat load against a deployment, with a report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        type=http_url,
        action="append",
        required=True,
        help="base URL (a load balancer or a node); repeat to spread over several",
    )
    p.add_argument(
        "--api-key",
        action="append",
        help=f"API key (repeatable); a file or ${API_KEY_ENV} keeps keys out of process lists",
    )
    p.add_argument("--api-keys-file", help="file with one API key per line")
    p.add_argument(
        "--keys",
        type=non_negative_int,
        default=0,
        help=f"tenants to simulate (default: one per key, or {DEFAULT_TENANTS} with a single key)",
    )
    p.add_argument(
        "--conversations",
        type=positive_int,
        default=2,
        help="conversations per tenant (with --zipf: on average, by popularity)",
    )
    p.add_argument(
        "--zipf",
        type=positive_float,
        default=None,
        metavar="S",
        help="Zipf tenant popularity: tenant i draws 1/(i+1)^S of the arrivals and as many "
        "of the conversations (default: equally busy tenants)",
    )
    p.add_argument(
        "--conversation-key",
        choices=["none", "prompt_cache_key", "x-session-id"],
        default="none",
        help="how a conversation is named to the proxy (default none: it hashes the "
        "conversation's opening)",
    )
    p.add_argument(
        "--max-turns", type=positive_int, default=16, help="turns before a conversation starts over"
    )
    p.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help=f"Poisson arrivals per second (default {DEFAULT_RATE:g})",
    )
    p.add_argument(
        "--concurrency",
        type=non_negative_int,
        default=0,
        help="alone: a fixed number of requests in flight (closed loop); with "
        "--rate: the most requests in flight (arrivals beyond are skipped)",
    )
    p.add_argument("--duration", type=positive_float, default=30.0, help="measured seconds of load")
    p.add_argument(
        "--warmup",
        type=non_negative_float,
        default=0.0,
        help="seconds of the same load before the measured part, not counted (default 0)",
    )
    p.add_argument("--max-requests", type=positive_int, default=100_000)
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="streamed answers (default) or not",
    )
    p.add_argument(
        "--model", type=non_empty, action="append", help="model (repeatable; default llama-3.1-8b)"
    )
    p.add_argument("--max-tokens", type=positive_int, default=32, help="answer length asked for")
    p.add_argument(
        "--spread",
        choices=["round_robin", "random"],
        default="round_robin",
        help="how requests are spread over several --url",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=positive_float, default=120.0, help="seconds per request")
    p.add_argument(
        "--backend-metrics",
        action="append",
        metavar="[NAME=]URL",
        help="a backend's /metrics (repeatable; NAME as its x-backend-id)",
    )
    p.add_argument(
        "--node-metrics",
        action="append",
        metavar="[NAME=]URL",
        help="a node's /metrics (repeatable)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the JSON report here (- : stdout)")
    p.set_defaults(func=run_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m affinity_node.sim.bench_cli ...` until the command is wired into the CLI."""
    import asyncio

    parser = argparse.ArgumentParser(prog="affinity-node bench", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_bench(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
