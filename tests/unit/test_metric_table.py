"""The metric declaration table (observability/metrics.py) declares exactly the series the
Contract and the dashboards rely on: every family's name, type, help, label names, bucket
edges and the series created at zero, as recorded in data/metrics_declared.json (written from
the declarations before the table replaced them)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics, LedgerMetrics

GOLDEN = Path(__file__).parent / "data" / "metrics_declared.json"


def declared() -> list[list[object]]:
    registry = CollectorRegistry()
    affinity = AffinityMetrics(registry)
    affinity.init_models(["model-a"])
    LedgerMetrics(registry, affinity.db_errors)
    http = HttpMetrics(registry, "1.2.3")
    http.show_config("0123456789ab")
    http.init_routes(["/v1/chat/completions", "/metrics"], ["/v1/chat/completions"])
    http.init_backends(["http://10.0.0.1:8000"])
    rows: list[list[object]] = []
    for family in registry.collect():
        for sample in family.samples:
            rows.append(
                [family.name, family.type, family.documentation, sample.name,
                 sorted(sample.labels.items()), sample.value]
            )  # fmt: skip
    return sorted(rows, key=json.dumps)


def test_the_table_declares_what_the_contract_names() -> None:
    want = json.loads(GOLDEN.read_text())
    got = json.loads(json.dumps(declared()))
    assert [r[:5] for r in got] == [r[:5] for r in want]
    assert got == want


def test_the_config_hash_has_one_series_at_a_time() -> None:
    registry = CollectorRegistry()
    http = HttpMetrics(registry, "1.2.3")
    for digest in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "bbbbbbbbbbbb"):
        http.show_config(digest)
    series = [
        (s.labels, s.value)
        for family in registry.collect()
        if family.name == "affinity_config_info"
        for s in family.samples
    ]
    assert series == [({"hash": "bbbbbbbbbbbb"}, 1.0)]


if __name__ == "__main__":  # regenerate: python -m tests.unit.test_metric_table
    GOLDEN.write_text("[\n" + ",\n".join(json.dumps(r) for r in declared()) + "\n]\n")
