"""Several runs side by side: a text table for people, JSON for scripts and tests, and a
progress line while a run goes."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

from affinity_node.sim.report import LedgerTenant, RunReport, TenantFigures
from affinity_node.sim.workload import LiveStats
from affinity_node.vocabulary import AFFINITY_HEADERS, MISS_OUTCOMES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _tenant(t: TenantFigures) -> str:
    cell = f"t{t.tenant}: {_pct(t.top_share)} {t.top_backend} / {t.fanout}"
    if t.spilled:
        cell += f" ({_pct(t.spilled / t.requests)} spilled)"
    return cell


def _ledger_tenant(t: LedgerTenant) -> str:
    return f"t{t.tenant}: {_pct(t.hit_rate)} on {t.backends}"


def _saved_ms(r: RunReport) -> str:
    saved = r.cache.prefill_saved_s if r.cache is not None else None
    ok = r.requests - r.errors
    return "-" if saved is None or not ok else f"{1000 * saved / ok:.1f}"


def render_table(runs: Sequence[RunReport], notes: Sequence[str] = ()) -> str:
    """The runs side by side, one column each."""
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cells: Iterable[str]) -> None:
        rows.append((label, list(cells)))

    if any(r.chain_failures is not None for r in runs):
        row("chain failures (404s)", (_n(r.chain_failures) for r in runs))
    row("requests (errors)", (f"{r.requests} ({r.errors})" for r in runs))
    row("throughput (req/s)", (f"{r.throughput_rps:.1f}" for r in runs))
    sources = {r.cache.source for r in runs if r.cache is not None}
    label = "prefix-cache hit rate"
    if sources and sources != {"backend metrics"}:
        label += " (" + ", ".join(sorted(sources)) + ")"
    row(label, (_pct(r.cache.hit_rate if r.cache else None) for r in runs))
    if any(r.cache is not None and r.cache.prefill_saved_s is not None for r in runs):
        row("engine prefill saved / request (ms)", (_saved_ms(r) for r in runs))
    row(
        "TTFT p50 / p90 / p99 (ms)",
        (f"{_ms(r.ttft_p50_s)} / {_ms(r.ttft_p90_s)} / {_ms(r.ttft_p99_s)}" for r in runs),
    )
    row(
        "end-to-end p50 / p99 (ms)",
        (f"{_ms(r.latency_p50_s)} / {_ms(r.latency_p99_s)}" for r in runs),
    )
    row("req/backend min / max", (f"{_n(r.backend_min)} / {_n(r.backend_max)}" for r in runs))
    row(
        "busiest / mean",
        ("-" if r.busiest_over_mean is None else f"{r.busiest_over_mean:.2f}x" for r in runs),
    )
    backends = sorted({b for r in runs for b in r.per_backend})
    for b in backends:
        cells = []
        for r in runs:
            count = r.per_backend.get(b)
            rate = r.cache.backend_hit_rate(b) if r.cache is not None else None
            cells.append(
                "-" if count is None else f"{count}" + ("" if rate is None else f" ({_pct(rate)})")
            )
        row(f"  {b} requests (hit)", cells)
    if any(r.max_waiting is not None for r in runs):
        row(
            "largest queue " + "/".join(backends),
            (
                "-"
                if r.max_waiting is None
                else "/".join(_n(r.max_waiting.get(b)) for b in backends)
                for r in runs
            ),
        )
    for rank in range(max((len(r.tenants) for r in runs), default=0)):
        row(
            f"busiest tenant #{rank + 1}: top backend / fan-out",
            (_tenant(r.tenants[rank]) if rank < len(r.tenants) else "-" for r in runs),
        )
    for rank in range(max((len(r.ledger) for r in runs), default=0)):
        row(
            f"ledger tenant #{rank + 1}: hit rate on backends",
            (_ledger_tenant(r.ledger[rank]) if rank < len(r.ledger) else "-" for r in runs),
        )
    seen: list[str] = [h for h in AFFINITY_HEADERS if any(h in r.affinity_headers for r in runs)]
    seen += sorted({h for r in runs for h in r.affinity_headers} - set(AFFINITY_HEADERS))
    for h in seen:
        row(f"x-affinity: {h}", (str(r.affinity_headers.get(h, 0)) for r in runs))
    if any(r.nodes is not None for r in runs):
        row("node affinity hits", (_n(r.nodes.hits if r.nodes else None) for r in runs))
        row(
            "node misses (created/db/lock/degr.)",
            (
                "-"
                if r.nodes is None
                else "/".join(_n(r.nodes.misses.get(o, 0.0)) for o in MISS_OUTCOMES)
                for r in runs
            ),
        )
        row(
            "node rebinds / spills",
            (
                "-" if r.nodes is None else f"{_n(r.nodes.rebinds)} / {_n(r.nodes.spills)}"
                for r in runs
            ),
        )
    if any(r.skipped_arrivals for r in runs):
        row("skipped arrivals", (str(r.skipped_arrivals) for r in runs))
    if any(r.warmup_requests for r in runs):
        row("warm-up requests (not counted)", (str(r.warmup_requests) for r in runs))

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(r.name), *(len(cells[i]) for _, cells in rows)) for i, r in enumerate(runs)]
    lines = [
        "  ".join([" " * width0, *(r.name.rjust(w) for r, w in zip(runs, widths, strict=True))])
    ]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        lines.append(
            "  ".join(
                [label.ljust(width0), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]
            )
        )
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

    def __init__(
        self,
        label: str,
        duration_s: float,
        stream: IO[str] | None = None,
        plain_every_s: float = 5.0,
    ) -> None:
        self.label = label
        self.duration_s = duration_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.plain_every_s = plain_every_s
        self._last_plain = -math.inf
        self._width = 0

    def text(self, stats: LiveStats) -> str:
        return (
            f"{self.label}: {stats.elapsed_s:4.0f}/{self.duration_s:.0f} s  "
            f"{stats.sent} sent  {stats.done} done  {stats.errors} errors  "
            f"{stats.inflight} in flight"
        )

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
