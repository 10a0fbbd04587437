"""The demo's per-tenant section from the usage ledger: the busiest tenants of a run's keys,
their hit rate and backends, in the table and the JSON."""

from __future__ import annotations

import json
import uuid

from affinity_node.sim.render import render_table, report_json
from affinity_node.sim.report import LedgerTenant, build_report, ledger_tenants
from tests.unit.test_report import records

KEYS = [uuid.UUID(int=i) for i in range(7)]


def usage_row(
    key: int, requests: int, prompt: int, cached: int, *backends: str
) -> dict[str, object]:
    """A row as `affinity-node usage` reads it (store.ledger_store.usage_report)."""
    return {
        "api_key_id": KEYS[key] if key >= 0 else uuid.uuid4(),
        "requests": requests,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "backends": list(backends),
    }


def test_the_busiest_of_the_run_s_tenants_with_hit_rate_and_backends() -> None:
    rows = [
        usage_row(0, 10, 1000, 900, "b0"),
        usage_row(1, 30, 3000, 600, "b0", "b1", "b2"),
        usage_row(2, 5, 0, 0, "b1"),  # no usage reported
        usage_row(3, 10, 100, 50, "b2"),
        usage_row(4, 1, 10, 0, "b0"),
        usage_row(5, 2, 10, 0, "b0"),
        usage_row(6, 3, 10, 0, "b0"),
        usage_row(1, 30, 3000, 2400, "b1", "b3"),  # the same key on another model
        usage_row(-1, 999, 10, 10, "b0"),  # another run's key
    ]
    top = ledger_tenants(rows, KEYS, top=5)
    assert top == [
        LedgerTenant(1, 60, 0.5, 4),
        LedgerTenant(0, 10, 0.9, 1),
        LedgerTenant(3, 10, 0.5, 1),
        LedgerTenant(2, 5, None, 1),
        LedgerTenant(6, 3, 0.0, 1),
    ]


def test_the_table_and_the_json_show_them() -> None:
    run = build_report("shared", records([("b0", "hit", 0.01)] * 3))
    run.ledger = [LedgerTenant(4, 60, 0.5, 4), LedgerTenant(0, 10, None, 1)]
    other = build_report("off", records([("b0", "hit", 0.01)] * 3))
    rows = {line[:45].strip(): line for line in render_table([other, run]).splitlines()}
    first = rows["ledger tenant #1: hit rate on backends"].split()
    assert first[-5:] == ["-", "t4:", "50.0%", "on", "4"]
    assert rows["ledger tenant #2: hit rate on backends"].split()[-5:] == [
        "-",
        "t0:",
        "-",
        "on",
        "1",
    ]
    doc = report_json([other, run])
    json.dumps(doc)
    assert doc["runs"][0]["ledger_tenants"] == []
    assert doc["runs"][1]["ledger_tenants"][0] == {
        "tenant": 4,
        "requests": 60,
        "hit_rate": 0.5,
        "backends": 4,
    }
