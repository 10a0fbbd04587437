"""The report math: deltas of Prometheus counters, percentiles, figures and rendering."""

from __future__ import annotations

import json

import pytest

from affinity_node.sim.render import ProgressLine, render_table, report_json
from affinity_node.sim.report import (
    RunReport,
    build_report,
    cache_figures,
    delta,
    deltas,
    node_figures,
    percentile,
    tenant_figures,
)
from affinity_node.sim.support import parse_metrics
from affinity_node.sim.workload import LiveStats, RequestRecord, WorkloadResult

MODEL = "llama-3.1-8b"

# -- report math ---------------------------------------------------------------------------


def backend_metrics(queries: float, hits: float) -> str:
    return (
        "# TYPE vllm:prefix_cache_queries counter\n"
        f'vllm:prefix_cache_queries_total{{model_name="m"}} {queries}\n'
        "# TYPE vllm:prefix_cache_hits counter\n"
        f'vllm:prefix_cache_hits_total{{model_name="m"}} {hits}\n'
    )


def node_metrics(hits: float, created: float, found: float, rebinds: float, spills: float) -> str:
    return (
        "# TYPE affinity_cache_hits counter\n"
        f'affinity_cache_hits_total{{model="m"}} {hits}\n'
        "# TYPE affinity_cache_misses counter\n"
        f'affinity_cache_misses_total{{model="m",outcome="created"}} {created}\n'
        f'affinity_cache_misses_total{{model="m",outcome="found_in_db"}} {found}\n'
        "# TYPE affinity_rebinds counter\n"
        f'affinity_rebinds_total{{model="m",reason="unhealthy"}} {rebinds}\n'
        "# TYPE affinity_spills counter\n"
        f'affinity_spills_total{{model="m"}} {spills}\n'
    )


def test_prefix_cache_hit_rate_is_computed_from_deltas_over_all_backends():
    before = {
        "b0": parse_metrics(backend_metrics(1000, 900)),
        "b1": parse_metrics(backend_metrics(500, 100)),
    }
    after = {
        "b0": parse_metrics(backend_metrics(3000, 2500)),  # +2000 queried, +1600 hit
        "b1": parse_metrics(backend_metrics(1500, 300)),
    }  # +1000 queried, +200 hit
    figures = cache_figures(deltas(before, after))
    assert figures.queries == 3000 and figures.hits == 1800
    assert figures.hit_rate == pytest.approx(0.6)
    assert figures.backend_hit_rate("b0") == pytest.approx(0.8)
    assert figures.backend_hit_rate("b1") == pytest.approx(0.2)
    assert figures.backend_hit_rate("b9") is None
    # Earlier traffic does not count: the raw totals would say 3800/4500.
    assert figures.hit_rate != pytest.approx(3800 / 4500)


def test_a_counter_that_went_backwards_was_reset():
    before = parse_metrics(node_metrics(100, 10, 5, 1, 0))
    after = parse_metrics(node_metrics(30, 4, 0, 0, 2))  # the node restarted
    d = delta(before, after)
    assert node_figures({"n": d}).hits == 30


def test_node_figures_sum_every_node():
    before = {
        "n0": parse_metrics(node_metrics(0, 0, 0, 0, 0)),
        "n1": parse_metrics(node_metrics(50, 5, 0, 0, 0)),
    }
    after = {
        "n0": parse_metrics(node_metrics(70, 8, 2, 1, 3)),
        "n1": parse_metrics(node_metrics(90, 6, 4, 0, 1)),
    }
    figures = node_figures(deltas(before, after))
    assert figures.hits == 70 + 40
    assert figures.misses == {"created": 9, "found_in_db": 6, "found_after_lock": 0, "degraded": 0}
    assert figures.miss_total == 15
    assert (figures.rebinds, figures.spills) == (1, 4)


def test_percentiles_interpolate_between_ranks():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0 and percentile(values, 0) == 1.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None


def records(spec: list[tuple[str, str, float]], errors: int = 0) -> WorkloadResult:
    out = [
        RequestRecord(
            i,
            0,
            "t0/c0/g0",
            1,
            MODEL,
            0,
            0.0,
            status=200,
            ttft_s=ttft,
            latency_s=ttft + 0.01,
            backend_id=b,
            affinity=a,
        )
        for i, (b, a, ttft) in enumerate(spec)
    ]
    out += [
        RequestRecord(len(out) + i, 0, "t0/c0/g0", 1, MODEL, 0, 0.0, error="HTTP 502: x")
        for i in range(errors)
    ]
    return WorkloadResult(out, 2.0, 0)


def test_run_report_counts_backends_headers_and_errors():
    spec = [("b0", "hit", 0.01)] * 6 + [("b1", "miss", 0.10)] * 2
    report = build_report("shared", records(spec, errors=1), backends=["b0", "b1", "b2"])
    assert report.requests == 9 and report.errors == 1
    assert report.error_samples == ["HTTP 502: x"]
    assert report.per_backend == {"b0": 6, "b1": 2, "b2": 0}
    assert (report.backend_min, report.backend_max) == (0, 6)
    assert report.busiest_over_mean == pytest.approx(6 / (8 / 3))
    assert report.affinity_headers == {"hit": 6, "miss": 2}
    assert report.ttft_p50_s == pytest.approx(0.01)
    assert report.ttft_p99_s == pytest.approx(0.10)
    assert report.throughput_rps == pytest.approx(4.5)
    assert report.cache is None and report.nodes is None


def test_client_side_hit_rate_from_usage_when_no_backend_metrics():
    result = records([("b0", "hit", 0.01)] * 2)
    result.records[0].prompt_tokens, result.records[0].cached_tokens = 100, 50
    result.records[1].prompt_tokens, result.records[1].cached_tokens = 300, 270
    report = build_report("bench", result)
    assert report.cache is not None and report.cache.source == "usage.cached_tokens"
    assert report.cache.hit_rate == pytest.approx(320 / 400)


def test_table_and_json_show_runs_side_by_side():
    b_before = {"b0": parse_metrics(backend_metrics(0, 0))}
    runs: list[RunReport] = []
    for name, hits in (("affinity off", 300), ("node-local", 600), ("shared", 900)):
        b_after = {"b0": parse_metrics(backend_metrics(1000, hits))}
        n_after = {"n0": parse_metrics(node_metrics(hits / 10, 3, 0, 0, 0))}
        runs.append(
            build_report(
                name, records([("b0", "hit", 0.02)] * 4), deltas(b_before, b_after), n_after
            )
        )
    table = render_table(runs, ["a note"])
    header, _rule, *rows = table.splitlines()
    assert header.split() == ["affinity", "off", "node-local", "shared"]
    hit_row = next(r for r in rows if r.startswith("prefix-cache hit rate"))
    assert hit_row.split()[-3:] == ["30.0%", "60.0%", "90.0%"]
    assert "note: a note" in table
    doc = report_json(runs, ["a note"], extra=1)
    json.dumps(doc)  # serialisable as is
    assert [r["name"] for r in doc["runs"]] == ["affinity off", "node-local", "shared"]
    assert [r["prefix_cache"]["hit_rate"] for r in doc["runs"]] == [0.3, 0.6, 0.9]
    assert doc["runs"][2]["node_metrics"]["hits"] == 90
    assert doc["ok"] is True and doc["extra"] == 1


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.text = ""
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_progress_line_rewrites_in_place_only_on_a_terminal():
    tty = _Stream(True)
    line = ProgressLine("[x]", 10, stream=tty)  # type: ignore[arg-type]
    line(LiveStats(elapsed_s=1, sent=5, done=4))
    line(LiveStats(elapsed_s=2, sent=9, done=9))
    line.finish(LiveStats(elapsed_s=10, sent=20, done=20))
    assert tty.text.count("\r") == 3 and tty.text.endswith("\n")
    plain = _Stream(False)
    line = ProgressLine("[x]", 10, stream=plain)  # type: ignore[arg-type]
    for i in range(5):  # within plain_every_s: one line, not five
        line(LiveStats(elapsed_s=i, sent=i))
    line.finish(LiveStats(elapsed_s=10, sent=20, done=20))
    assert "\r" not in plain.text and plain.text.count("\n") == 2


# -- the skew scenario's rows ----------------------------------------------------------------


def tenant_records(spec: list[tuple[int, str, str]], warmup: int = 0) -> WorkloadResult:
    """(tenant, backend, x-affinity) per request; the first `warmup` ones are warm-up."""
    out = [
        RequestRecord(
            i,
            tenant,
            f"t{tenant}/c0/g0",
            1,
            MODEL,
            0,
            float(i),
            status=200,
            ttft_s=0.001 * (i + 1),
            latency_s=0.001 * (i + 1) + 0.01,
            backend_id=b,
            affinity=a,
            warmup=i < warmup,
        )
        for i, (tenant, b, a) in enumerate(spec)
    ]
    return WorkloadResult(out, float(len(out)), 0, warmup_s=float(warmup))


def test_tenant_figures_rank_tenants_and_count_backends_with_five_percent():
    spec = (
        [(0, "b0", "hit")] * 60
        + [(0, "b1", "hit")] * 36
        + [(0, "b2", "spill")] * 4  # 4% of t0: below the fan-out threshold
        + [(1, "b3", "hit")] * 30
        + [(2, "b2", "hit")] * 10
        + [(3, "b1", "hit")] * 5
    )
    figures = tenant_figures(tenant_records(spec).records)
    assert [f.tenant for f in figures] == [0, 1, 2]
    top = figures[0]
    assert (top.requests, top.top_backend, top.fanout, top.spilled) == (100, "b0", 2, 4)
    assert top.top_share == pytest.approx(0.6)
    assert (figures[1].top_share, figures[1].fanout) == (1.0, 1)
    assert tenant_figures([], top=3) == []


def test_warmup_requests_stay_out_of_the_figures():
    result = tenant_records([(0, "b0", "hit")] * 10 + [(1, "b1", "hit")] * 30, warmup=10)
    report = build_report("x", result, backends=["b0", "b1"])
    assert report.requests == 30 and report.warmup_requests == 10
    assert report.per_backend == {"b0": 0, "b1": 30}
    assert [t.tenant for t in report.tenants] == [1]
    assert report.elapsed_s == pytest.approx(30.0)  # 40 s in all, 10 of them warm-up
    # TTFTs of the measured requests are 11..40 ms.
    assert report.ttft_p50_s == pytest.approx(0.0255)
    assert report.ttft_p90_s == pytest.approx(0.0371)
    assert report.ttft_p99_s == pytest.approx(0.03971)


def test_table_and_json_show_ttft_p90_queues_and_busiest_tenants():
    spec = [(0, "b0", "hit")] * 8 + [(0, "b1", "spill")] * 2 + [(1, "b1", "hit")] * 5
    runs = [
        build_report(name, tenant_records(spec), backends=["b0", "b1"], max_waiting=waiting)
        for name, waiting in (("off", None), ("one", {"b0": 31.0, "b1": 0.0}))
    ]
    table = render_table(runs)
    rows = {line[:40].strip(): line for line in table.splitlines()}
    assert rows["TTFT p50 / p90 / p99 (ms)"].split()[-10:] == ["8", "/", "14", "/", "15"] * 2
    assert "end-to-end p50 / p99 (ms)" in rows
    assert rows["largest queue b0/b1"].split()[-2:] == ["-", "31/0"]
    tenant = "busiest tenant #{}: top backend / fan-out"
    assert rows[tenant.format(1)].endswith("t0: 80.0% b0 / 2 (20.0% spilled)")
    assert rows[tenant.format(2)].endswith("t1: 100.0% b1 / 1")
    doc = report_json(runs)
    json.dumps(doc)
    one = doc["runs"][1]
    assert one["ttft_s"]["p90"] == pytest.approx(0.0136)
    assert one["max_waiting_per_backend"] == {"b0": 31.0, "b1": 0.0}
    assert doc["runs"][0]["max_waiting_per_backend"] is None
    assert one["busiest_tenants"][0] == {
        "tenant": 0,
        "requests": 10,
        "top_backend": "b0",
        "top_share": 0.8,
        "fanout": 2,
        "spilled": 2,
    }
