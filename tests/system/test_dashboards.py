"""The Grafana dashboards: generated from code, committed up to date, importable as they are."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from affinity_node.devtools import dashboards as d
from affinity_node.vocabulary import LEDGER_OUTCOMES

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
BOARDS = {name: build() for name, build in d.DASHBOARDS.items()}
PROMETHEUS_BOARDS = {n: b for n, b in BOARDS.items() if n != "affinity-tenants.json"}
"""The boards on Prometheus; the Tenants board reads the usage ledger in Postgres."""


def test_committed_json_is_what_the_generator_builds():
    stale = d.stale(GRAFANA / "dashboards")
    assert stale == [], (
        f"stale dashboards {stale}: run `python -m affinity_node.devtools.dashboards`"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    d.write(tmp_path)
    assert d.main(["--check", "--dir", str(tmp_path)]) == 0
    path = tmp_path / "affinity-overview.json"
    path.write_text(path.read_text().replace("Cache hit ratio", "Cache hit rate"))
    assert d.main(["--check", "--dir", str(tmp_path)]) == 1
    assert "affinity-overview.json" in capsys.readouterr().err


def test_the_three_dashboards():
    titles = {b["title"] for b in BOARDS.values()}
    assert titles == {"Affinity overview", "Traffic and backends", "Tenants"}
    assert len({b["uid"] for b in BOARDS.values()}) == 3


@pytest.mark.parametrize("name", sorted(PROMETHEUS_BOARDS))
def test_datasource_is_a_template_variable_never_an_import_input(name: str):
    board = BOARDS[name]
    text = (GRAFANA / "dashboards" / name).read_text()
    assert "${DS_" not in text and "__inputs" not in text
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query"
    assert "instance" in variables["node"]["definition"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"]


def test_provisioned_datasource_uid_is_pinned_and_is_the_variables_default():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prom,) = ds["datasources"]
    assert prom["type"] == "prometheus" and prom["uid"] == d.DATASOURCE_UID
    for board in PROMETHEUS_BOARDS.values():
        var = board["templating"]["list"][0]
        assert var["current"]["value"] == d.DATASOURCE_UID
    provider = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "affinity.yml").read_text()
    )
    (p,) = provider["providers"]
    assert p["type"] == "file" and p["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_layout_ids_and_ref_ids(name: str):
    panels = BOARDS[name]["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs)


_AGGREGATED = re.compile(r"sum(?: by \([^()]*\) )?\($")


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_rates_and_quantiles_aggregate_across_nodes(name: str):
    for title, ref, expr in d.expressions(BOARDS[name]):
        for m in re.finditer(r"\b(rate|increase)\(", expr):
            assert _AGGREGATED.search(expr[: m.start()]), f"{title}/{ref}: bare {m[0]} in {expr}"
        for m in re.finditer(r"histogram_quantile\([0-9.]+, ", expr):
            assert expr[m.end() :].startswith("sum by (le"), f"{title}/{ref}: {expr}"
        for metric in re.findall(r"\baffinity_[a-z_]+\{([^}]*)\}", expr):
            assert 'instance=~"$node"' in metric, f"{title}/{ref}: no $node filter: {expr}"


def test_panels_cover_the_issue():
    titles = {p["title"] for b in BOARDS.values() for p in b["panels"]}
    for wanted in (
        "Cache hit ratio",
        "Misses by outcome",
        "Lock wait p50 / p99",
        "Rebinds and spills by reason",
        "Bindings per backend",
        "Binding skew (max / mean per backend)",
        "Notify lag p50 / p99",
        "Listener up per node",
        "Listener reconnects and cache resyncs per node",
        "Degraded requests and database errors",
        "Database up per node",
        "Requests by route and code",
        "Errors by route and code",
        "Added latency (proxy overhead) p50 / p99",
        "TTFT p50 / p99 per backend",
        "In-flight per backend",
        "Backend health",
        "vLLM prefix-cache hit rate",
        "vLLM queue depth",
    ):
        assert wanted in titles
    exprs = " ".join(e for b in BOARDS.values() for _, _, e in d.expressions(b))
    for metric in ("prefix_cache_hits_total", "prefix_cache_queries_total", "num_requests_waiting"):
        # vllm:x or vllm_x: see dashboards.vllm()
        assert f'__name__=~"vllm[:_]{metric}"' in exprs


def test_json_is_plain_and_stable():
    for name, board in BOARDS.items():
        assert json.loads(d.render(board)) == board
        assert d.render(board) == d.render(d.DASHBOARDS[name]())


def test_the_tenants_board_reads_the_ledger_through_a_variable():
    board = BOARDS["affinity-tenants.json"]
    text = (GRAFANA / "dashboards" / "affinity-tenants.json").read_text()
    assert "${DS_" not in text and "__inputs" not in text
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "grafana-postgresql-datasource")
    assert ds["current"]["value"] == d.LEDGER_UID
    for name in ("tenant", "model"):  # All is a literal the queries test for, never a list
        assert variables[name]["allValue"] == d.ALL and variables[name]["datasource"] == d.LEDGER
    for panel in board["panels"]:
        assert panel["datasource"] == d.LEDGER and panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == d.LEDGER and t["rawQuery"] and "expr" not in t
            # every panel keeps to the time range and, but for per-tenant tops, the choices
            assert "$__timeFrom()" in t["rawSql"] and "$__timeTo()" in t["rawSql"]
            assert "($tenant)" in t["rawSql"] and "($model)" in t["rawSql"]
    ledger = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "ledger.yml").read_text())
    (source,) = ledger["datasources"]
    assert source["uid"] == d.LEDGER_UID and source["type"] == "grafana-postgresql-datasource"
    assert source["user"] == "affinity_reader"
    assert source["secureJsonData"]["password"] == "${AFFINITY_READER_PASSWORD}"


def test_the_tenants_board_covers_the_issue():
    board = BOARDS["affinity-tenants.json"]
    titles = {p["title"] for p in board["panels"]}
    assert {
        "Cache hit rate per tenant",
        "Tenants losing the most cache",
        "Routing outcomes per tenant",
    } <= titles
    assert set(d.OUTCOMES) == set(LEDGER_OUTCOMES)
    queries = " ".join(q for _, _, _, q in d.sql_queries(board))
    for outcome in LEDGER_OUTCOMES:
        assert f"u.{outcome}_requests" in queries


def test_grafana_macros_are_expanded_as_grafana_does():
    query = "WHERE t > $__timeFrom() AND t <= $__timeTo() AND ('*' IN ($tenant) OR x IN ($tenant))"
    sent = d.expand_sql(query, "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", {"tenant": None})
    assert sent == (
        "WHERE t > '2026-01-01T00:00:00Z' AND t <= '2026-01-02T00:00:00Z' "
        "AND ('*' IN ('*') OR x IN ('*'))"
    )
    sent = d.expand_sql("x IN ($tenant)", "a", "b", {"tenant": ["o'k", "b"]})
    assert sent == "x IN ('o''k','b')"


@pytest.mark.parametrize("name", sorted(PROMETHEUS_BOARDS))
def test_every_query_is_scoped_by_cluster_and_namespace(name: str):
    """Environments sharing one Prometheus never blend: every series selector (the node's,
    vLLM's) and every variable query below the scope carries both matchers."""
    board = PROMETHEUS_BOARDS[name]
    for title, ref, expr in d.expressions(board):
        selectors = re.findall(r"\{([^{}]*)\}", expr.replace("{{", "").replace("}}", ""))
        assert selectors, f"{title}/{ref}: {expr}"
        for body in selectors:
            assert 'cluster=~"$cluster"' in body, f"{title}/{ref}: no $cluster: {expr}"
            assert 'namespace=~"$namespace"' in body, f"{title}/{ref}: no $namespace: {expr}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    names = list(variables)
    assert names.index("cluster") < names.index("namespace") < names.index("node")
    for scope in ("cluster", "namespace"):
        # Defaults to All = `.*`, which also matches series without the label (compose).
        assert variables[scope]["includeAll"] and variables[scope]["allValue"] == ".*"
        assert variables[scope]["current"]["value"] == ["$__all"]
    assert 'cluster=~"$cluster"' in variables["namespace"]["definition"]
    assert 'namespace=~"$namespace"' in variables["node"]["definition"]
