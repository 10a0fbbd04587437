"""Figures of a workload run, from three sources, and their rendering.

- the client's records (workload.py): TTFT and latency percentiles, requests per backend (from
  `x-backend-id`), `x-affinity` counts, errors;
- the backends' /metrics: the prefix-cache hit rate that matters (hit tokens / queried tokens,
  as deltas over the run, so earlier traffic does not blur it);
- the nodes' /metrics: affinity cache hits, misses by outcome, rebinds and spills (deltas,
  summed over nodes; a counter that went backwards means a restart and counts from zero).

Several runs render side by side as a text table, or as JSON for scripts and tests.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from affinity_node.sim.workload import LiveStats, WorkloadResult

SampleKey = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[SampleKey, float]
"""Prometheus samples: (sample name, labels) -> value."""

BACKEND_QUERIES = "vllm:prefix_cache_queries_total"
BACKEND_HITS = "vllm:prefix_cache_hits_total"
NODE_HITS = "affinity_cache_hits_total"
NODE_MISSES = "affinity_cache_misses_total"
NODE_REBINDS = "affinity_rebinds_total"
NODE_SPILLS = "affinity_spills_total"
MISS_OUTCOMES = ("created", "found_in_db", "found_after_lock", "degraded")
AFFINITY_HEADERS = ("hit", "miss", "rebind", "spill", "degraded", "bypass")


# -- metrics ---------------------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            out[key] = float(sample.value)
    return out


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> Samples:
    """GET `url` (a /metrics endpoint) and parse it."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def scrape_all(
    session: aiohttp.ClientSession, urls: Mapping[str, str]
) -> dict[str, Samples]:
    """Scrapes every named endpoint at once (name -> /metrics URL)."""
    names = list(urls)
    results = await asyncio.gather(*(scrape(session, urls[n]) for n in names))
    return dict(zip(names, results, strict=True))


def delta(before: Samples, after: Samples) -> Samples:
    """after - before per series; a counter that went down was reset: its value is the delta."""
    out: Samples = {}
    for key, value in after.items():
        prev = before.get(key, 0.0)
        out[key] = value - prev if value >= prev else value
    return out


def deltas(before: Mapping[str, Samples], after: Mapping[str, Samples]) -> dict[str, Samples]:
    return {name: delta(before.get(name, {}), samples) for name, samples in after.items()}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


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

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.queries if self.queries > 0 else None

    def backend_hit_rate(self, backend: str) -> float | None:
        q, h = self.per_backend.get(backend, (0.0, 0.0))
        return h / q if q > 0 else None


def cache_figures(backend_deltas: Mapping[str, Samples]) -> CacheFigures:
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
                    b: {"queried_tokens": q, "hit_tokens": h,
                        "hit_rate": self.cache.backend_hit_rate(b)}
                    for b, (q, h) in sorted(self.cache.per_backend.items())
                },
            }
        return {
            "name": self.name,
            "requests": self.requests,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "elapsed_s": self.elapsed_s,
            "throughput_rps": self.throughput_rps,
            "skipped_arrivals": self.skipped_arrivals,
            "ttft_s": {"p50": self.ttft_p50_s, "p99": self.ttft_p99_s},
            "latency_s": {"p50": self.latency_p50_s, "p99": self.latency_p99_s},
            "prefix_cache": cache,
            "requests_per_backend": dict(sorted(self.per_backend.items())),
            "backend_requests_min": self.backend_min,
            "backend_requests_max": self.backend_max,
            "busiest_over_mean": self.busiest_over_mean,
            "affinity_headers": dict(sorted(self.affinity_headers.items())),
            "node_metrics": None if self.nodes is None else asdict(self.nodes),
        }


def client_cache_figures(result: WorkloadResult) -> CacheFigures | None:
    """Hit rate from the answers' usage (cached_tokens) when the servers report it."""
    queries = hits = 0.0
    per: dict[str, tuple[float, float]] = {}
    for r in result.records:
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
) -> RunReport:
    """`backends`: every backend id expected, so one that got no request counts as 0."""
    ok = [r for r in result.records if r.ok]
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
    for r in result.records:
        if r.error is not None and r.error not in samples and len(samples) < 5:
            samples.append(r.error)
    cache = cache_figures(backend_deltas) if backend_deltas else client_cache_figures(result)
    return RunReport(
        name=name,
        requests=len(result.records),
        errors=len(result.records) - len(ok),
        elapsed_s=result.elapsed_s,
        skipped_arrivals=result.skipped_arrivals,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        per_backend=per_backend,
        affinity_headers=headers,
        cache=cache,
        nodes=node_figures(node_deltas) if node_deltas else None,
        error_samples=samples,
    )


# -- rendering -------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def render_table(runs: Sequence[RunReport], notes: Sequence[str] = ()) -> str:
    """The runs side by side, one column each."""
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cells: Iterable[str]) -> None:
        rows.append((label, list(cells)))

    row("requests (errors)", (f"{r.requests} ({r.errors})" for r in runs))
    row("throughput (req/s)", (f"{r.throughput_rps:.1f}" for r in runs))
    sources = {r.cache.source for r in runs if r.cache is not None}
    label = "prefix-cache hit rate"
    if sources and sources != {"backend metrics"}:
        label += " (" + ", ".join(sorted(sources)) + ")"
    row(label, (_pct(r.cache.hit_rate if r.cache else None) for r in runs))
    row("TTFT p50 / p99 (ms)", (f"{_ms(r.ttft_p50_s)} / {_ms(r.ttft_p99_s)}" for r in runs))
    row("latency p50 / p99 (ms)",
        (f"{_ms(r.latency_p50_s)} / {_ms(r.latency_p99_s)}" for r in runs))
    row("req/backend min / max",
        (f"{_n(r.backend_min)} / {_n(r.backend_max)}" for r in runs))
    row("busiest / mean",
        ("-" if r.busiest_over_mean is None else f"{r.busiest_over_mean:.2f}x" for r in runs))
    backends = sorted({b for r in runs for b in r.per_backend})
    for b in backends:
        cells = []
        for r in runs:
            count = r.per_backend.get(b)
            rate = r.cache.backend_hit_rate(b) if r.cache is not None else None
            cells.append("-" if count is None else
                         f"{count}" + ("" if rate is None else f" ({_pct(rate)})"))
        row(f"  {b} requests (hit)", cells)
    seen = [h for h in AFFINITY_HEADERS if any(h in r.affinity_headers for r in runs)]
    seen += sorted({h for r in runs for h in r.affinity_headers} - set(AFFINITY_HEADERS))
    for h in seen:
        row(f"x-affinity: {h}", (str(r.affinity_headers.get(h, 0)) for r in runs))
    if any(r.nodes is not None for r in runs):
        row("node affinity hits", (_n(r.nodes.hits if r.nodes else None) for r in runs))
        row("node misses (created/db/lock/degr.)", (
            "-" if r.nodes is None else
            "/".join(_n(r.nodes.misses.get(o, 0.0)) for o in MISS_OUTCOMES) for r in runs))
        row("node rebinds / spills", (
            "-" if r.nodes is None else f"{_n(r.nodes.rebinds)} / {_n(r.nodes.spills)}"
            for r in runs))
    if any(r.skipped_arrivals for r in runs):
        row("skipped arrivals", (str(r.skipped_arrivals) for r in runs))

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(r.name), *(len(cells[i]) for _, cells in rows)) for i, r in enumerate(runs)]
    lines = ["  ".join([" " * width0, *(r.name.rjust(w) for r, w in zip(runs, widths,
                                                                       strict=True))])]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        lines.append("  ".join([label.ljust(width0),
                                *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]))
    errors = [(r.name, e) for r in runs for e in r.error_samples]
    if errors:
        lines.append("")
        lines.extend(f"error in {name}: {e}" for name, e in errors)
    if notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def report_json(
    runs: Sequence[RunReport], notes: Sequence[str] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "runs": [r.to_json() for r in runs],
        "ok": all(r.errors == 0 for r in runs),
        "notes": list(notes),
        **extra,
    }


# -- live progress ---------------------------------------------------------------------------


class ProgressLine:
    """A status line on stderr: rewritten in place once a second on a terminal, else a plain
    line every few seconds so logs stay readable."""

    def __init__(self, label: str, duration_s: float, stream: IO[str] | None = None,
                 plain_every_s: float = 5.0) -> None:
        self.label = label
        self.duration_s = duration_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._last_plain = -math.inf
        self._width = 0

    def text(self, stats: LiveStats) -> str:
        return (f"{self.label}: {stats.elapsed_s:4.0f}/{self.duration_s:.0f} s  "
                f"{stats.sent} sent  {stats.done} done  {stats.errors} errors  "
                f"{stats.inflight} in flight")

    def __call__(self, stats: LiveStats) -> None:
        line = self.text(stats)
        if self.tty:
            pad = max(self._width - len(line), 0)
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            return
        now = time.monotonic()
        if now - self._last_plain >= self.plain_every_s:
            self._last_plain = now
            print(line, file=self.stream, flush=True)

    def finish(self, stats: LiveStats) -> None:
        if self.tty:
            self(stats)
            self.stream.write("\n")
        else:
            print(self.text(stats), file=self.stream, flush=True)
        self.stream.flush()
