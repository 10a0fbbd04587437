"""The `scale` scenario: the fleet changes under load, with the commands an operator runs.

The nodes' config lists three backends; a fourth runs but is unknown to them. A third of the
way through the measured part it joins with `affinity-node backends add` (rebalance moves
idle pairs onto it); two thirds through, one of the original three is drained with
`affinity-node backends drain --deadline`. The same workload runs once without these events,
as the baseline. The report gives, per phase, each backend's share of the requests, the hit
rate, TTFT p50/p99 and errors, and how long the drained backend took to reach zero running
requests (and whether it still holds a binding).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import asyncpg

from affinity_node.sim.fleet import MODEL
from affinity_node.sim.report import percentile
from affinity_node.sim.workload import RequestRecord

PHASES = ("configured", "one added", "one drained")
SHARE_WINDOW_S = 20.0
"""The added backend's share is measured over the last this many seconds of its phase."""
DRAIN_DEADLINE_S = 30.0


@dataclass
class ScaleFacts:
    """What the events did, as the load saw it (offsets from the measured part's start)."""

    added_at: float | None = None
    drain_at: float | None = None
    drained_running_zero_s: float | None = None
    """Seconds from the drain command until the backend ran nothing and held no binding."""
    drained_bindings_left: int | None = None
    commands: list[str] = field(default_factory=list)


async def _cli(*args: str, dsn: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "affinity_node", *args, "--dsn", dsn,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"affinity-node {' '.join(args)} failed:\n{out.decode()}")
    return f"affinity-node {' '.join(args)}"


async def _running(session: aiohttp.ClientSession, url: str) -> float | None:
    from affinity_node.upstream.load_poll import parse_load

    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return parse_load(await r.text())[0]
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _bindings_on(dsn: str, url: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM api_key_model_affinity WHERE expires_at > now() "
            "AND (provider_url = $1 OR $1 = ANY(fanout_urls))",
            url,
        )
        return count
    finally:
        await conn.close()


async def run_events(
    session: aiohttp.ClientSession,
    dsn: str,
    urls: Sequence[str],
    duration_s: float,
    measuring: asyncio.Future[float],
    say: Callable[[str], None],
) -> ScaleFacts:
    """Add the last backend at 1/3 of the measured part, drain the first at 2/3; then wait
    (up to the deadline) for the drained one to run nothing and hold no binding."""
    facts = ScaleFacts()
    added, drained = urls[-1], urls[0]
    start = await measuring  # the monotonic time the measured part began
    await asyncio.sleep(max(0.0, start + duration_s / 3 - time.monotonic()))
    facts.commands.append(await _cli("backends", "add", added, "--model", MODEL, dsn=dsn))
    facts.added_at = time.monotonic() - start
    say(f"[scale] {facts.commands[-1]}")
    await asyncio.sleep(max(0.0, start + 2 * duration_s / 3 - time.monotonic()))
    facts.commands.append(
        await _cli("backends", "drain", drained, "--deadline", f"{DRAIN_DEADLINE_S:g}s", dsn=dsn)
    )
    began = time.monotonic()
    facts.drain_at = began - start
    say(f"[scale] {facts.commands[-1]}")
    while time.monotonic() - began < DRAIN_DEADLINE_S + 10:
        running = await _running(session, drained)
        held = await _bindings_on(dsn, drained)
        facts.drained_bindings_left = held
        if running == 0 and held == 0:
            facts.drained_running_zero_s = time.monotonic() - began
            break
        await asyncio.sleep(0.25)
    return facts


async def reset_registry(dsn: str, urls: Sequence[str]) -> None:
    """Back to the config's three backends (between runs)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM affinity_backends WHERE url = ANY($1::text[])", list(urls))
    finally:
        await conn.close()


@dataclass
class PhaseFigures:
    phase: str
    requests: int
    errors: int
    hit_rate: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    share: dict[str, float]
    """Backend id -> share of the phase's answered requests."""


def phase_figures(
    records: Sequence[RequestRecord],
    bounds: Sequence[float],
    backends: Sequence[str],
    warmup_s: float,
) -> list[PhaseFigures]:
    """Records split at `bounds` (offsets into the measured part), per phase."""
    out = []
    for i, name in enumerate(PHASES):
        lo, hi = bounds[i], bounds[i + 1]
        recs = [r for r in records if not r.warmup and lo <= r.start_s - warmup_s < hi]
        ok = [r for r in recs if r.ok]
        queried = sum(r.prompt_tokens or 0 for r in ok)
        hits = sum(r.cached_tokens or 0 for r in ok)
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        share = {b: 0.0 for b in backends}
        for r in ok:
            if r.backend_id is not None:
                share[r.backend_id] = share.get(r.backend_id, 0.0) + 1 / len(ok)
        out.append(PhaseFigures(
            name, len(recs), len(recs) - len(ok), hits / queried if queried else None,
            percentile(ttfts, 50), percentile(ttfts, 99), share,
        ))  # fmt: skip
    return out


def added_share(
    records: Sequence[RequestRecord],
    backend: str,
    since_s: float,
    until_s: float,
    warmup_s: float,
) -> float | None:
    """The backend's share of requests answered between two offsets, over the mean share."""
    ok = [
        r for r in records
        if r.ok and not r.warmup and since_s <= r.start_s - warmup_s < until_s
    ]  # fmt: skip
    backends = {r.backend_id for r in ok if r.backend_id}
    if not ok or not backends:
        return None
    mine = sum(1 for r in ok if r.backend_id == backend) / len(ok)
    return mine / (1 / len(backends))


def render(
    runs: Sequence[tuple[str, list[PhaseFigures], float | None]],
    facts: ScaleFacts,
    added: str,
    added_ratio: float | None,
    notes: Sequence[str],
    phase_s: float,
) -> str:
    window_s = min(SHARE_WINDOW_S, phase_s)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f}"

    lines = []
    for title, phases, overall in runs:
        lines.append(f"{title}: overall prefix-cache hit rate {pct(overall)}")
        head = f"  {'phase':<14}{'requests':>9}{'errors':>8}{'hit rate':>10}{'TTFT p50/p99':>15}"
        lines.append(head + "  share of requests per backend")
        for p in phases:
            shares = "  ".join(f"{b} {100 * s:4.1f}%" for b, s in sorted(p.share.items()))
            lines.append(
                f"  {p.phase:<14}{p.requests:>9}{p.errors:>8}{pct(p.hit_rate):>10}"
                f"{ms(p.ttft_p50_s) + ' / ' + ms(p.ttft_p99_s):>15}  {shares}"
            )
        lines.append("")
    zero = facts.drained_running_zero_s
    lines.append(
        f"added backend {added}: {added_ratio:.2f}x the mean share of requests over the "
        f"last {window_s:.0f} s of its phase ({window_s:.0f} s until {phase_s:.0f} s after it "
        "joined)"
        if added_ratio is not None
        else f"added backend {added}: no share measured"
    )
    lines.append(
        f"drained backend: zero running requests and no binding {zero:.1f} s after the drain "
        f"command (deadline {DRAIN_DEADLINE_S:g} s)"
        if zero is not None
        else f"drained backend: still {facts.drained_bindings_left} binding(s) or running requests "
        f"after the deadline"
    )
    lines += ["", *[f"note: {n}" for n in notes], *[f"ran: {c}" for c in facts.commands]]
    return "\n".join(lines)


def to_json(
    runs: Sequence[tuple[str, list[PhaseFigures], float | None]],
    facts: ScaleFacts,
    added_ratio: float | None,
) -> dict[str, Any]:
    return {
        "runs": [
            {"name": t, "hit_rate": overall, "phases": [asdict(p) for p in phases]}
            for t, phases, overall in runs
        ],
        "added_share_over_mean": added_ratio,
        "drain_deadline_s": DRAIN_DEADLINE_S,
        **asdict(facts),
    }
