"""Figures of a workload run, from three sources (rendered by sim/render.py).

- the client's records (workload.py): TTFT and latency percentiles, requests per backend (from
  `x-backend-id`), `x-affinity` counts, errors;
- the backends' /metrics: the prefix-cache hit rate that matters (hit tokens / queried tokens,
  as deltas over the run, so earlier traffic does not blur it);
- the nodes' /metrics: affinity cache hits, misses by outcome, rebinds and spills (deltas,
  summed over nodes; a counter that went backwards means a restart and counts from zero);
- the backends' queues sampled during the run (sampler.py): the largest `num_requests_waiting`.

A warm-up's requests (flagged by the workload) are left out of every client figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from affinity_node.sim.support import Samples, total
from affinity_node.sim.workload import RequestRecord, WorkloadResult
from affinity_node.vocabulary import MISS_OUTCOMES

BACKEND_QUERIES = "vllm:prefix_cache_queries_total"
BACKEND_HITS = "vllm:prefix_cache_hits_total"
NODE_HITS = "affinity_cache_hits_total"
NODE_MISSES = "affinity_cache_misses_total"
NODE_REBINDS = "affinity_rebinds_total"
NODE_SPILLS = "affinity_spills_total"
FANOUT_MIN_SHARE = 0.05
"""A backend counts in a tenant's fan-out when it served at least this share of its requests:
a stray spill does not make a tenant look spread."""


# -- deltas --------------------------------------------------------------------------------


def delta(before: Samples, after: Samples) -> Samples:
    """after - before per series; a counter that went down was reset: its value is the delta."""
    out: Samples = {}
    for key, value in after.items():
        prev = before.get(key, 0.0)
        out[key] = value - prev if value >= prev else value
    return out


def deltas(before: Mapping[str, Samples], after: Mapping[str, Samples]) -> dict[str, Samples]:
    return {name: delta(before.get(name, {}), samples) for name, samples in after.items()}


# -- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = math.floor(k)
    hi = math.ceil(k)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class CacheFigures:
    """Prefix-cache tokens over the run: queried, found; per backend and in all."""

    queries: float
    hits: float
    per_backend: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = "backend metrics"
    prefill_saved_s: float | None = None
    """Prefill time the cache hits saved, at the engine's own measured seconds per computed
    prompt token (llama.cpp only: the simulator's time is a model, not a measurement)."""

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries > 0 else None

    def backend_hit_rate(self, backend: str) -> float | None:
        q, h = self.per_backend.get(backend, (0.0, 0.0))
        return h / q if q > 0 else None


LLAMACPP_COMPUTED = "llamacpp:prompt_tokens_total"
LLAMACPP_CACHED = "llamacpp:prompt_tokens_cached_total"
LLAMACPP_PREFILL_S = "llamacpp:prompt_seconds_total"


def llamacpp_cache_figures(backend_deltas: Mapping[str, Samples]) -> CacheFigures:
    """llama.cpp counts the prompt tokens it computed and those it found cached, and the
    seconds it spent computing: queried = both, saved = cached x its seconds per token."""
    per: dict[str, tuple[float, float]] = {}
    seconds = computed = 0.0
    for name, s in backend_deltas.items():
        done, found = total(s, LLAMACPP_COMPUTED), total(s, LLAMACPP_CACHED)
        per[name] = (done + found, found)
        seconds += total(s, LLAMACPP_PREFILL_S)
        computed += done
    hits = sum(h for _, h in per.values())
    saved = hits * seconds / computed if computed else None
    return CacheFigures(
        sum(q for q, _ in per.values()), hits, per, "llama.cpp /metrics", prefill_saved_s=saved
    )


def cache_figures(backend_deltas: Mapping[str, Samples]) -> CacheFigures:
    if any(n == LLAMACPP_COMPUTED for s in backend_deltas.values() for n, _ in s):
        return llamacpp_cache_figures(backend_deltas)
    per = {
        name: (total(s, BACKEND_QUERIES), total(s, BACKEND_HITS))
        for name, s in backend_deltas.items()
    }
    return CacheFigures(sum(q for q, _ in per.values()), sum(h for _, h in per.values()), per)


@dataclass
class NodeFigures:
    """Affinity counters of every node, summed over the run."""

    hits: float
    misses: dict[str, float]
    rebinds: float
    spills: float

    @property
    def miss_total(self) -> float:
        return sum(self.misses.values())


def node_figures(node_deltas: Mapping[str, Samples]) -> NodeFigures:
    merged: Samples = {}
    for samples in node_deltas.values():
        for key, value in samples.items():
            merged[key] = merged.get(key, 0.0) + value
    return NodeFigures(
        hits=total(merged, NODE_HITS),
        misses={o: total(merged, NODE_MISSES, outcome=o) for o in MISS_OUTCOMES},
        rebinds=total(merged, NODE_REBINDS),
        spills=total(merged, NODE_SPILLS),
    )


@dataclass(frozen=True)
class TenantFigures:
    """How one tenant's requests spread over backends (from the answers' `x-backend-id`)."""

    tenant: int
    requests: int
    top_backend: str | None
    top_share: float
    """Share of its requests served by `top_backend`, its most-used backend."""
    fanout: int
    """Backends that served at least FANOUT_MIN_SHARE of its requests."""
    spilled: int = 0
    """Requests answered with `x-affinity: spill` (served outside its binding)."""


def tenant_figures(records: Iterable[RequestRecord], top: int = 3) -> list[TenantFigures]:
    """The `top` tenants with the most requests, busiest first (ties: lower index)."""
    per: dict[int, dict[str, int]] = {}
    spills: dict[int, int] = {}
    for r in records:
        counts = per.setdefault(r.tenant, {})
        name = r.backend_id or "?"
        counts[name] = counts.get(name, 0) + 1
        if r.affinity == "spill":
            spills[r.tenant] = spills.get(r.tenant, 0) + 1
    ranked = sorted(per.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    out = []
    for tenant, counts in ranked[:top]:
        n = sum(counts.values())
        backend, most = max(counts.items(), key=lambda item: (item[1], item[0]))
        fanout = sum(1 for c in counts.values() if c >= FANOUT_MIN_SHARE * n)
        out.append(TenantFigures(tenant, n, backend, most / n, fanout, spills.get(tenant, 0)))
    return out


@dataclass(frozen=True)
class LedgerTenant:
    """One tenant as the nodes' usage ledger saw the run (warm-up included)."""

    tenant: int
    requests: int
    hit_rate: float | None
    """Cached prompt tokens / prompt tokens, as the backends reported them."""
    backends: int
    """Backends that served it."""


def ledger_tenants(
    rows: Iterable[Mapping[str, Any]], key_ids: Sequence[Any], top: int = 5
) -> list[LedgerTenant]:
    """The `top` tenants by requests from `usage` report rows (affinity-node usage), for the
    run's keys (`key_ids[i]` is tenant i's key)."""
    index = {key: i for i, key in enumerate(key_ids)}
    totals: dict[int, tuple[int, int, int, frozenset[str]]] = {}
    for r in rows:
        i = index.get(r["api_key_id"])
        if i is None:
            continue  # another run's key
        n, prompt, cached, backends = totals.get(i, (0, 0, 0, frozenset()))
        totals[i] = (
            n + r["requests"],
            prompt + r["prompt_tokens"],
            cached + r["cached_tokens"],
            backends | frozenset(r["backends"]),
        )
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:top]
    return [
        LedgerTenant(i, n, cached / prompt if prompt else None, len(backends))
        for i, (n, prompt, cached, backends) in ranked
    ]


@dataclass
class RunReport:
    """One run's figures; `None` where a source was not available."""

    name: str
    requests: int
    errors: int
    elapsed_s: float
    skipped_arrivals: int
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    per_backend: dict[str, int]
    affinity_headers: dict[str, int]
    cache: CacheFigures | None
    nodes: NodeFigures | None
    error_samples: list[str] = field(default_factory=list)
    ttft_p90_s: float | None = None
    max_waiting: dict[str, float] | None = None
    """The largest `vllm:num_requests_waiting` sampled on each backend; None: not sampled."""
    tenants: list[TenantFigures] = field(default_factory=list)
    """The busiest tenants, busiest first."""
    warmup_requests: int = 0
    ledger: list[LedgerTenant] = field(default_factory=list)
    """The busiest tenants by the nodes' usage ledger (empty when not read)."""
    chain_failures: int | None = None
    """Requests naming a stored response answered 404 (agents scenario; None elsewhere)."""

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def backend_min(self) -> int | None:
        return min(self.per_backend.values()) if self.per_backend else None

    @property
    def backend_max(self) -> int | None:
        return max(self.per_backend.values()) if self.per_backend else None

    @property
    def busiest_over_mean(self) -> float | None:
        """Requests of the busiest backend over the mean: 1.0 is a perfect spread."""
        if not self.per_backend:
            return None
        mean = sum(self.per_backend.values()) / len(self.per_backend)
        return max(self.per_backend.values()) / mean if mean > 0 else None

    def to_json(self) -> dict[str, Any]:
        cache = None
        if self.cache is not None:
            cache = {
                "source": self.cache.source,
                "hit_rate": self.cache.hit_rate,
                "queried_tokens": self.cache.queries,
                "hit_tokens": self.cache.hits,
                "per_backend": {
                    b: {
                        "queried_tokens": q,
                        "hit_tokens": h,
                        "hit_rate": self.cache.backend_hit_rate(b),
                    }
                    for b, (q, h) in sorted(self.cache.per_backend.items())
                },
            }
        return {
            "name": self.name,
            "requests": self.requests,
            "errors": self.errors,
            "chain_failures": self.chain_failures,
            "error_samples": self.error_samples,
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "skipped_arrivals": self.skipped_arrivals,
            "warmup_requests": self.warmup_requests,
            "ttft_s": {"p50": self.ttft_p50_s, "p90": self.ttft_p90_s, "p99": self.ttft_p99_s},
            "latency_s": {"p50": self.latency_p50_s, "p99": self.latency_p99_s},
            "prefix_cache": cache,
            "requests_per_backend": dict(sorted(self.per_backend.items())),
            "backend_requests_min": self.backend_min,
            "backend_requests_max": self.backend_max,
            "busiest_over_mean": self.busiest_over_mean,
            "affinity_headers": dict(sorted(self.affinity_headers.items())),
            "node_metrics": None if self.nodes is None else asdict(self.nodes),
            "max_waiting_per_backend": (
                None if self.max_waiting is None else dict(sorted(self.max_waiting.items()))
            ),
            "busiest_tenants": [asdict(t) for t in self.tenants],
            "ledger_tenants": [asdict(t) for t in self.ledger],
        }


def client_cache_figures(result: WorkloadResult) -> CacheFigures | None:
    """Hit rate from the answers' usage (cached_tokens) when the servers report it."""
    queries = hits = 0.0
    per: dict[str, tuple[float, float]] = {}
    for r in result.measured:
        if r.ok and r.prompt_tokens is not None and r.cached_tokens is not None:
            queries += r.prompt_tokens
            hits += r.cached_tokens
            name = r.backend_id or "?"
            q, h = per.get(name, (0.0, 0.0))
            per[name] = (q + r.prompt_tokens, h + r.cached_tokens)
    if queries == 0:
        return None
    return CacheFigures(queries, hits, per, source="usage.cached_tokens")


def build_report(
    name: str,
    result: WorkloadResult,
    backend_deltas: Mapping[str, Samples] | None = None,
    node_deltas: Mapping[str, Samples] | None = None,
    backends: Iterable[str] = (),
    max_waiting: Mapping[str, float] | None = None,
) -> RunReport:
    """`backends`: every backend id expected, so one that got no request counts as 0;
    `max_waiting`: the sampler's peaks per backend."""
    measured = result.measured
    ok = [r for r in measured if r.ok]
    per_backend = dict.fromkeys(backends, 0)
    headers: dict[str, int] = {}
    for r in ok:
        if r.backend_id is not None:
            per_backend[r.backend_id] = per_backend.get(r.backend_id, 0) + 1
        if r.affinity is not None:
            headers[r.affinity] = headers.get(r.affinity, 0) + 1
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s for r in ok]
    samples: list[str] = []
    for r in measured:
        if r.error is not None and r.error not in samples and len(samples) < 5:
            samples.append(r.error)
    cache = cache_figures(backend_deltas) if backend_deltas else client_cache_figures(result)
    return RunReport(
        name=name,
        requests=len(measured),
        errors=len(measured) - len(ok),
        elapsed_s=result.measured_s,
        skipped_arrivals=result.skipped_arrivals,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p90_s=percentile(ttfts, 90),
        ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        per_backend=per_backend,
        affinity_headers=headers,
        cache=cache,
        nodes=node_figures(node_deltas) if node_deltas else None,
        error_samples=samples,
        max_waiting=None if max_waiting is None else dict(max_waiting),
        tenants=tenant_figures(ok),
        warmup_requests=len(result.records) - len(measured),
    )
