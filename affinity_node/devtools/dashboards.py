"""The Grafana dashboards, as code: plain JSON dicts, written to grafana/dashboards/.

    python -m affinity_node.devtools.dashboards            # (re)write the JSON files
    python -m affinity_node.devtools.dashboards --check    # exit 1 when they are stale

The JSON in the repository is what users import and what Grafana provisioning loads; a test
fails when it differs from what this module builds, and the live test evaluates every query
below through a real Prometheus.

Conventions: every panel reads the `${datasource}` template variable (never `${DS_...}`
inputs, which provisioning does not resolve); `$cluster` and `$namespace` scope every query
(SCOPE), `$node` filters the proxy nodes by instance and
`$model` by canonical model; rates and quantiles aggregate across nodes with `sum by`, so the
panels stay right with any number of nodes. Gauges that every node reports about the same
thing (bindings per backend: every node caches the same table) take the `max` over nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
DATASOURCE_UID = "prometheus"
"""The uid pinned in grafana/provisioning/datasources/prometheus.yml (the default choice)."""

TAG = "affinity-node"
SCOPE = 'cluster=~"$cluster",namespace=~"$namespace"'
"""On every query: environments (clusters, namespaces) sharing one Prometheus never blend.
Both variables default to All (`.*`), which also matches series without the label (compose,
one Prometheus per cluster: `cluster` is an external label there, absent from queries)."""
NODE = SCOPE + ',instance=~"$node"'
RATE = "$__rate_interval"
SCHEMA_VERSION = 39

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "grafana" / "dashboards"


# -- building blocks ---------------------------------------------------------------------------


def sel(*matchers: str) -> str:
    """A label selector body: sel(NODE, 'code=~"5.."') -> instance=~"$node",code=~"5.." ."""
    return ",".join(matchers)


def rate(metric: str, *matchers: str) -> str:
    return f"rate({metric}{{{sel(*matchers)}}}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "", *matchers: str) -> str:
    """histogram_quantile over buckets summed across nodes (and `by` labels, if any)."""
    labels = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket', *matchers)}))"


def target(expr: str, legend: str = "", *, exemplar: bool = False, instant: bool = False) -> Json:
    out: Json = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        out["instant"] = True
        out["range"] = False
    else:
        out["range"] = True
    if exemplar:
        out["exemplar"] = True
    return out


def timeseries(
    title: str,
    targets: list[Json],
    unit: str = "short",
    description: str = "",
    *,
    width: int = 12,
    height: int = 8,
    min_zero: bool = True,
    max_one: bool = False,
    stack: bool = False,
    datasource: Json = DATASOURCE,
) -> Json:
    defaults: Json = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_zero:
        defaults["min"] = 0
    if max_one:
        defaults["max"] = 1
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
        "_size": (width, height),
    }


def stat(
    title: str,
    expr: str,
    unit: str = "short",
    description: str = "",
    *,
    thresholds: list[tuple[float | None, str]] | None = None,
    width: int = 6,
    height: int = 4,
    targets: list[Json] | None = None,
    datasource: Json = DATASOURCE,
) -> Json:
    """A single figure; `expr` is PromQL unless `targets` (and `datasource`) say otherwise."""
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": datasource,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        },
        "targets": targets if targets is not None else [target(expr)],
        "_size": (width, height),
    }


def _layout(panels: list[Json]) -> list[Json]:
    """Ids, refIds and grid positions, left to right in rows of 24 columns."""
    x = y = row_height = 0
    out = []
    for pid, panel in enumerate(panels, start=1):
        width, height = panel.pop("_size")
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        panel["id"] = pid
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        for i, t in enumerate(panel["targets"]):
            t["refId"] = chr(ord("A") + i)
        x += width
        row_height = max(row_height, height)
        out.append(panel)
    return out


def _datasource_variable(
    kind: str = "prometheus", text: str = "Prometheus", uid: str = DATASOURCE_UID
) -> Json:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": kind,
        "current": {"selected": False, "text": text, "value": uid},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }


def _query_variable(name: str, label: str, query: str) -> Json:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "options": [],
        "refresh": 2,
        "regex": "",
        "sort": 1,
    }


CLUSTER_VARIABLE_QUERY = "label_values(affinity_build_info, cluster)"
NAMESPACE_VARIABLE_QUERY = 'label_values(affinity_build_info{cluster=~"$cluster"}, namespace)'
NODE_VARIABLE_QUERY = (
    'label_values(affinity_build_info{cluster=~"$cluster",namespace=~"$namespace"}, instance)'
)
MODEL_VARIABLE_QUERY = "label_values(affinity_cache_hits_total, model)"


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Json],
    variables: list[Json] | None = None,
    time_from: str = "now-1h",
    refresh: str = "30s",
) -> Json:
    """`variables`: the template variables (default: Prometheus, node and model)."""
    if variables is None:
        variables = [
            _datasource_variable(),
            _query_variable("cluster", "Cluster", CLUSTER_VARIABLE_QUERY),
            _query_variable("namespace", "Namespace", NAMESPACE_VARIABLE_QUERY),
            _query_variable("node", "Node", NODE_VARIABLE_QUERY),
            _query_variable("model", "Model", MODEL_VARIABLE_QUERY),
        ]
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": refresh,
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": [TAG],
                "title": "Affinity dashboards",
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "templating": {"list": variables},
        "panels": _layout(panels),
    }


# -- the dashboards ----------------------------------------------------------------------------

MODEL = 'model=~"$model"'
HITS = rate("affinity_cache_hits_total", NODE, MODEL)
MISSES = rate("affinity_cache_misses_total", NODE, MODEL)
HIT_RATIO = f"sum({HITS}) / (sum({HITS}) + sum({MISSES}))"
BINDINGS = f"max by (backend) (affinity_cache_bindings{{{NODE}}})"
API = 'route=~"/v1/.*"'
DEGRADED = 'outcome="degraded"'
CODE_5XX = 'code=~"5.."'
CODE_ERROR = 'code=~"[45].."'


def overview() -> Json:
    panels = [
        stat(
            "Cache hit ratio",
            HIT_RATIO,
            "percentunit",
            "Resolves answered from the node's cache (no database), all nodes together.",
            thresholds=[(None, "red"), (0.5, "orange"), (0.8, "green")],
        ),
        stat(
            "Bindings cached",
            f"max(affinity_cache_entries{{{NODE}}})",
            description="Bindings in the largest node cache (every node caches the table).",
        ),
        stat(
            "Listeners up",
            f"sum(affinity_listener_up{{{NODE}}})",
            description="Nodes whose LISTEN connection is healthy and synced.",
        ),
        stat(
            "Database up",
            f"sum(affinity_db_up{{{NODE}}})",
            description="Nodes whose last database operation succeeded.",
        ),
        timeseries(
            "Cache hit ratio",
            [
                target(HIT_RATIO, "all models"),
                target(
                    f"sum by (model) ({HITS}) / "
                    f"(sum by (model) ({HITS}) + sum by (model) ({MISSES}))",
                    "{{model}}",
                ),
            ],
            "percentunit",
            "Hits / (hits + misses), summed over nodes.",
            max_one=True,
        ),
        timeseries(
            "Misses by outcome",
            [
                target(f"sum by (outcome) ({MISSES})", "{{outcome}}"),
            ],
            "ops",
            "created: new binding; found_in_db: another node made it; found_after_lock: "
            "lost the race for the advisory lock; degraded: database unavailable.",
            stack=True,
        ),
        timeseries(
            "Lock wait p50 / p99",
            [
                target(quantile(0.5, "affinity_lock_wait_seconds", "", NODE), "p50"),
                target(quantile(0.99, "affinity_lock_wait_seconds", "", NODE), "p99"),
            ],
            "s",
            "Time a cold miss waited for the pair's advisory lock (SLO edges 1, 10, "
            "100 ms are bucket edges).",
        ),
        timeseries(
            "Rebinds and spills by reason",
            [
                target(
                    f"sum by (reason) ({rate('affinity_rebinds_total', NODE, MODEL)})",
                    "rebind: {{reason}}",
                ),
                target(
                    f"sum by (reason) ({rate('affinity_spills_total', NODE, MODEL)})",
                    "spill: {{reason}}",
                ),
            ],
            "ops",
            "Rebind: the binding moved (bound backend unhealthy, failed and another served, "
            "drained or rebalanced). Spill: one request served past its bound backend, the "
            "binding kept (load: the set cannot grow and the backend is overloaded; failover: "
            "it failed once but is not unhealthy).",
        ),
        timeseries(
            "Bindings per backend",
            [target(BINDINGS, "{{backend}}")],
            "short",
            "Bindings in the node caches per backend (max over nodes: each node caches "
            "the same shared table).",
            stack=True,
        ),
        timeseries(
            "Binding skew (max / mean per backend)",
            [
                target(f"max({BINDINGS}) / avg({BINDINGS})", "skew"),
            ],
            "none",
            "1 = evenly spread; 2 = the busiest backend holds twice the mean.",
        ),
        timeseries(
            "Notify lag p50 / p99",
            [
                target(quantile(0.5, "affinity_notify_lag_seconds", "", NODE), "p50"),
                target(quantile(0.99, "affinity_notify_lag_seconds", "", NODE), "p99"),
            ],
            "s",
            "From the binding change's commit to the node's cache (database clock).",
        ),
        timeseries(
            "Notifications by operation",
            [
                target(f"sum by (op) ({rate('affinity_notifications_total', NODE)})", "{{op}}"),
            ],
            "ops",
            "Binding changes received over LISTEN (refreshes do not notify).",
        ),
        timeseries(
            "Listener up per node",
            [
                target(f"max by (instance) (affinity_listener_up{{{NODE}}})", "{{instance}}"),
            ],
            "short",
            "1 while the node's LISTEN connection is healthy and synced.",
            max_one=True,
        ),
        timeseries(
            "Listener reconnects and cache resyncs per node",
            [
                target(
                    f"sum by (instance) (increase(affinity_listener_reconnects_total{{{NODE}}}"
                    f"[{RATE}]))",
                    "reconnects {{instance}}",
                ),
                target(
                    f"sum by (instance) (increase(affinity_cache_resyncs_total{{{NODE}}}[{RATE}]))",
                    "resyncs {{instance}}",
                ),
            ],
            "short",
            "A reconnect is followed by a resync: a catch-up from the node's watermark, or a "
            "paged snapshot when the deletion log no longer reaches back that far.",
        ),
        timeseries(
            "Degraded requests and database errors",
            [
                target(
                    f"sum({rate('affinity_cache_misses_total', NODE, MODEL, DEGRADED)})",
                    "degraded requests",
                ),
                target(
                    f"sum by (operation) ({rate('affinity_db_errors_total', NODE)})",
                    "db errors: {{operation}}",
                ),
            ],
            "ops",
            "Requests served by the fallback strategy because the database was "
            "unavailable, and the failed operations behind them.",
        ),
        timeseries(
            "Database up per node",
            [
                target(f"max by (instance) (affinity_db_up{{{NODE}}})", "{{instance}}"),
            ],
            "short",
            "1 while the node's last database operation succeeded.",
            max_one=True,
        ),
        timeseries(
            "NOTIFY queue usage",
            [
                target(f"max(affinity_notify_queue_usage{{{NODE}}})", "queue used"),
            ],
            "percentunit",
            "Postgres's NOTIFY queue (one per server: every node reads the same value). A "
            "session that LISTENs and sits in a transaction holds it; full, every binding "
            "change fails (alert AffinityNotifyQueueFilling above 50%).",
            max_one=True,
        ),
        timeseries(
            "Cache entries per node",
            [
                target(f"max by (instance) (affinity_cache_entries{{{NODE}}})", "{{instance}}"),
            ],
            "short",
            "Bindings each node holds in memory.",
        ),
        timeseries(
            "Cache evictions and rows read by resyncs",
            [
                target(
                    f"sum by (reason) ({rate('affinity_cache_evictions_total', NODE)})",
                    "evicted: {{reason}}",
                ),
                target(
                    f"sum by (mode) (increase(affinity_cache_resync_rows_total{{{NODE}}}[{RATE}]))",
                    "resync rows: {{mode}}",
                ),
            ],
            "short",
            "Evictions for size mean live bindings pushed out by affinity.cache_max_entries "
            "(raise it, or leave it at 0 to follow the table); expired ones leave by their "
            "deadline. Resync rows: what reconnects cost (incremental: the changes; full: "
            "every binding).",
        ),
        timeseries(
            "Backend load (as every node polls it)",
            [
                target(
                    "max by (backend, kind) "
                    f'(affinity_backend_load{{{NODE}, kind=~"running|waiting"}})',
                    "{{kind}} {{backend}}",
                ),
            ],
            "short",
            "Each vLLM backend's own running and waiting requests (vllm:num_requests_running, "
            "vllm:num_requests_waiting), counting every node's traffic: what fan-out decides "
            "on. A queue on one backend while others idle is alert "
            "AffinityBackendQueueWhileOthersIdle.",
        ),
        timeseries(
            "Backend KV cache usage",
            [
                target(
                    f'max by (backend) (affinity_backend_load{{{NODE}, kind="kv_usage"}})',
                    "{{backend}}",
                ),
            ],
            "percentunit",
            "vllm:kv_cache_usage_perc of each backend, as polled.",
            max_one=True,
        ),
        timeseries(
            "Fan-out changes",
            [
                target(
                    "sum by (direction, reason) "
                    f"({rate('affinity_fanout_changes_total', NODE, MODEL)})",
                    "{{direction}}: {{reason}}",
                ),
            ],
            "ops",
            "Binding sets grown (a member hot, none cool) and shrunk (every member cool for "
            "fanout_shrink_after_seconds, a member unhealthy or drained).",
        ),
        timeseries(
            "Pairs by binding-set size",
            [target(f"max by (size) (affinity_fanout_pairs{{{NODE}}})", "{{size}} backend(s)")],
            "short",
            "Cached pairs served by 1, 2, 3, ... backends (max over nodes: each caches the "
            "same table).",
            stack=True,
        ),
        timeseries(
            "Backend states",
            [
                target(
                    f"count by (state) (max by (backend, state) (affinity_backend_state{{{NODE}}})"
                    " == 1)",
                    "{{state}}",
                ),
            ],
            "short",
            "Backends active, draining (no new bindings, being moved off) and disabled, from "
            "the registry (`affinity-node backends ...`).",
            stack=True,
        ),
        timeseries(
            "Binding moves",
            [
                target(f"sum by (reason) ({rate('affinity_moves_total', NODE)})", "{{reason}}"),
            ],
            "ops",
            "Bindings moved by the fleet's mover: off draining backends, and onto idle ones "
            "(rebalance), paced fleet-wide.",
        ),
        timeseries(
            "Rejected notifications and key lookups",
            [
                target(
                    f"sum by (reason) ({rate('affinity_notifications_rejected_total', NODE)})",
                    "rejected: {{reason}}",
                ),
                target(
                    f"sum by (reason) ({rate('affinity_key_lookups_total', NODE)})",
                    "key lookups: {{reason}}",
                ),
            ],
            "ops",
            "Notifications not believed (forged or malformed: the pair is re-read instead), and "
            "the database statements the key cache ran (unknown tokens cost none while the "
            "node is in sync).",
        ),
        timeseries(
            "Refresh writes",
            [
                target(
                    f"sum by (instance) ({rate('affinity_refresh_writes_total', NODE)})",
                    "{{instance}}",
                ),
            ],
            "ops",
            "Batched TTL-extension statements (one per flush interval at most).",
        ),
        timeseries(
            "Usage ledger",
            [
                target(f"sum({rate('affinity_ledger_writes_total', NODE)})", "batches written"),
                target(
                    f"sum by (reason) ({rate('affinity_ledger_dropped_requests_total', NODE)})",
                    "requests dropped: {{reason}}",
                ),
                target(
                    f"sum({rate('affinity_ledger_unreported_total', NODE)})",
                    "answers without usage",
                ),
                target(f"max(affinity_ledger_pending_rows{{{NODE}}})", "rows waiting (max)"),
            ],
            "short",
            "The per-tenant usage ledger's health (its figures are on the Tenants dashboard): "
            "batches written (one statement per node per flush interval), requests that never "
            "reached the table, answers whose usage could not be read, rows waiting in a "
            "node's memory (they pile up while the database is away).",
        ),
    ]
    return dashboard(
        "affinity-overview",
        "Affinity overview",
        "Cache hits and misses, lock waits, rebinds, bindings per backend, listener and "
        "database health, across all proxy nodes.",
        panels,
    )


REQUESTS = rate("affinity_http_requests_total", NODE, API)
VLLM = SCOPE + ',model_name=~"$model"'
"""vLLM backends are filtered by the proxies' namespace too: pick All when they run in
another one."""


def vllm(metric: str) -> str:
    """A vLLM metric under either spelling: `vllm:x` (text format) or `vllm_x`.

    prometheus-client's OpenMetrics output (which Prometheus negotiates first) writes the
    samples of `vllm:x` as `vllm_x` (prometheus/client_python#1177), so which name Prometheus
    stores depends on the client version of the backend: match both.
    """
    return f'__name__=~"vllm[:_]{metric}"'


def traffic() -> Json:
    panels = [
        stat("API requests/s", f"sum({REQUESTS})", "reqps", "Requests to /v1/* on all nodes."),
        stat(
            "Error ratio (5xx)",
            f"(sum({rate('affinity_http_requests_total', NODE, API, CODE_5XX)}) "
            f"or vector(0)) / sum({REQUESTS})",
            "percentunit",
            "Share of API requests answered with a 5xx.",
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
        ),
        stat(
            "Added latency p99",
            quantile(0.99, "affinity_proxy_overhead_seconds", "", NODE),
            "s",
            "Time the node adds to a request: everything but waiting for the upstream.",
            thresholds=[(None, "green"), (0.005, "orange"), (0.025, "red")],
        ),
        stat(
            "Backends healthy on every node",
            f"sum(min by (backend) (affinity_backend_healthy{{{NODE}}}))",
            description="Backends that every node has in rotation.",
        ),
        timeseries(
            "Requests by route and code",
            [
                target(
                    f"sum by (route, code) ({rate('affinity_http_requests_total', NODE)})",
                    "{{route}} {{code}}",
                ),
            ],
            "reqps",
            "Every answer of every node, probes and scrapes included.",
            stack=True,
        ),
        timeseries(
            "Errors by route and code",
            [
                target(
                    f"sum by (route, code) "
                    f"({rate('affinity_http_requests_total', NODE, CODE_ERROR)})",
                    "{{route}} {{code}}",
                ),
            ],
            "reqps",
            "4xx are the clients' (bad key, bad body, unknown model); 5xx are ours "
            "or the backends' (502: upstream failed after one retry).",
        ),
        timeseries(
            "Request duration p50 / p99 by route",
            [
                target(
                    quantile(0.5, "affinity_http_request_duration_seconds", "route", NODE, API),
                    "p50 {{route}}",
                    exemplar=True,
                ),
                target(
                    quantile(0.99, "affinity_http_request_duration_seconds", "route", NODE, API),
                    "p99 {{route}}",
                    exemplar=True,
                ),
            ],
            "s",
            "To the last byte (streams included). Exemplars carry the request id.",
        ),
        timeseries(
            "Added latency (proxy overhead) p50 / p99",
            [
                target(quantile(0.5, "affinity_proxy_overhead_seconds", "", NODE), "p50"),
                target(quantile(0.99, "affinity_proxy_overhead_seconds", "", NODE), "p99"),
            ],
            "s",
            "Time the node adds: authentication, routing, affinity, copying bytes.",
        ),
        timeseries(
            "TTFT p50 / p99 per backend",
            [
                target(
                    quantile(0.5, "affinity_upstream_ttft_seconds", "backend", NODE),
                    "p50 {{backend}}",
                    exemplar=True,
                ),
                target(
                    quantile(0.99, "affinity_upstream_ttft_seconds", "backend", NODE),
                    "p99 {{backend}}",
                    exemplar=True,
                ),
            ],
            "s",
            "From forwarding to the first body byte, as the nodes see it.",
        ),
        timeseries(
            "Upstream requests by backend and code",
            [
                target(
                    f"sum by (backend, code) ({rate('affinity_upstream_requests_total', NODE)})",
                    "{{backend}} {{code}}",
                ),
            ],
            "reqps",
            "code=error: the backend could not be reached.",
            stack=True,
        ),
        timeseries(
            "In-flight per backend",
            [
                target(f"sum by (backend) (affinity_upstream_inflight{{{NODE}}})", "{{backend}}"),
            ],
            "short",
            "Requests forwarded and not finished, summed over nodes.",
            stack=True,
        ),
        timeseries(
            "Backend health",
            [
                target(f"sum by (backend) (affinity_backend_healthy{{{NODE}}})", "{{backend}}"),
            ],
            "short",
            "Nodes that have the backend in rotation.",
        ),
        timeseries(
            "Healthy backends per model",
            [
                target(
                    f"min by (model) (affinity_model_healthy_backends{{{NODE}, {MODEL}}})",
                    "{{model}}",
                ),
            ],
            "short",
            "Backends in rotation for each model on the node that sees the fewest.",
        ),
        stat(
            "Models without a healthy backend",
            f"count(max by (model) (affinity_model_healthy_backends{{{NODE}, {MODEL}}}) == 0)"
            " or vector(0)",
            description="Models no node can serve: their requests get 503 no_healthy_backend "
            "from the nodes, which stay ready (alert AffinityNoHealthyBackend).",
            thresholds=[(None, "green"), (1, "red")],
            width=12,
            height=8,
        ),
        timeseries(
            "vLLM prefix-cache hit rate",
            [
                target(
                    f"sum by (instance) ({rate('', vllm('prefix_cache_hits_total'), VLLM)}) / "
                    f"sum by (instance) ({rate('', vllm('prefix_cache_queries_total'), VLLM)})",
                    "{{instance}}",
                ),
                target(
                    f"sum({rate('', vllm('prefix_cache_hits_total'), VLLM)}) / "
                    f"sum({rate('', vllm('prefix_cache_queries_total'), VLLM)})",
                    "fleet",
                ),
            ],
            "percentunit",
            "Prompt tokens served from the backends' prefix cache "
            "(vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total, "
            "scraped from the backends themselves).",
            max_one=True,
        ),
        timeseries(
            "vLLM queue depth",
            [
                target(
                    f"sum by (instance) ({{{vllm('num_requests_waiting')}, {VLLM}}})",
                    "waiting {{instance}}",
                ),
                target(
                    f"sum by (instance) ({{{vllm('num_requests_running')}, {VLLM}}})",
                    "running {{instance}}",
                ),
            ],
            "short",
            "Requests queued (vllm:num_requests_waiting) and running on each backend "
            "(from the backends).",
        ),
        timeseries(
            "Refused by per-key limits",
            [
                target(
                    f"sum by (limit) ({rate('affinity_ratelimited_total', NODE, MODEL)})",
                    "{{limit}}",
                ),
            ],
            "reqps",
            "Requests answered 429 by a fleet-wide per-key limit (keys create|update --rpm, "
            "--tpm, --max-concurrent), by the limit that refused them, summed over the nodes.",
        ),
        timeseries(
            "Fair queue depth",
            [
                target(
                    f"sum by (priority) (affinity_queue_depth{{{NODE}, {MODEL}}})",
                    "class {{priority}}",
                ),
            ],
            "short",
            "Requests waiting in the nodes' fair queues (every backend of the model saturated), "
            "by priority class (keys update --priority), summed over the nodes.",
        ),
        timeseries(
            "Fair queue wait",
            [
                target(
                    quantile(0.5, "affinity_queue_wait_seconds", "model", NODE, MODEL),
                    "p50 {{model}}",
                ),
                target(
                    quantile(0.99, "affinity_queue_wait_seconds", "model", NODE, MODEL),
                    "p99 {{model}}",
                ),
            ],
            "s",
            "How long requests released from the fair queue waited in it (part of their TTFT).",
        ),
    ]
    return dashboard(
        "affinity-traffic",
        "Traffic and backends",
        "Requests and errors, added latency, TTFT, in-flight and health per backend, and the "
        "backends' own prefix-cache hit rate and queue depth.",
        panels,
    )


# -- the Tenants dashboard: the usage ledger, in Postgres -------------------------------------
#
# SQL on the `usage_ledger` table, through a Postgres datasource whose role reads the ledger and
# key names only (deploy/postgres/roles.sql: affinity_reader). Rows are per hour: a panel takes
# every hour that overlaps its time range, as `affinity-node usage --since` does, so the table
# "Tenants losing the most cache" shows what the command prints for the same window (a test
# compares them). Tests run every query below, macros expanded, as that role on a real Postgres.

LEDGER: Json = {"type": "grafana-postgresql-datasource", "uid": "${datasource}"}
LEDGER_UID = "affinity-ledger"
"""The uid pinned in grafana/provisioning/datasources/ledger.yml."""
ALL = "'*'"
"""The tenant and model variables' value for All (inserted as it is, unquoted)."""

WINDOW = (
    "u.hour_start > $__timeFrom()::timestamptz - interval '1 hour' "
    "AND u.hour_start <= $__timeTo()::timestamptz"
)
CHOSEN = (
    f"({ALL} IN ($tenant) OR u.api_key_id::text IN ($tenant)) "
    f"AND ({ALL} IN ($model) OR u.model IN ($model))"
)
LEDGER_ROWS = f"FROM usage_ledger AS u WHERE {WINDOW} AND {CHOSEN}"
TENANT = "k.name || ' (' || left(k.id::text, 8) || ') ' || u.model"
"""A tenant's label: key name, the start of its id (names need not be unique), model."""
HIT_RATE = "sum(u.cached_tokens)::float8 / nullif(sum(u.prompt_tokens), 0)"
LOST = "sum(u.prompt_tokens - u.cached_tokens)"


def top_tenants(order: str, limit: int) -> str:
    """The (key, model) pairs of the window, `order` first (a CTE named top)."""
    return (
        f"WITH top AS (SELECT u.api_key_id, u.model {LEDGER_ROWS} "
        f"GROUP BY u.api_key_id, u.model ORDER BY {order} DESC LIMIT {limit})"
    )


def sql(query: str, fmt: str = "table") -> Json:
    return {
        "datasource": LEDGER,
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": query,
    }


def per_tenant_hourly(value: str, order: str) -> str:
    """A time series per tenant (top 10 by `order`): one point per hour."""
    return (
        f"{top_tenants(order, 10)} "
        f'SELECT u.hour_start AS "time", {TENANT} AS metric, {value} AS value '
        "FROM usage_ledger AS u JOIN top USING (api_key_id, model) "
        f"JOIN api_keys AS k ON k.id = u.api_key_id WHERE {WINDOW} "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    )


OUTCOMES = ("hit", "fanout", "miss", "rebind", "spill", "degraded", "bypass")
"""vocabulary.LEDGER_OUTCOMES, in the order panels show them (a test checks they agree)."""


def table(title: str, query: str, description: str, units: dict[str, str]) -> Json:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": LEDGER,
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": name},
                    "properties": [{"id": "unit", "value": unit}],
                }
                for name, unit in units.items()
            ],
        },
        "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        "targets": [sql(query)],
        "_size": (24, 10),
    }


def _sql_variable(name: str, label: str, query: str) -> Json:
    """A multi-value variable from a ledger query (`__text`/`__value` columns, or one)."""
    variable = _query_variable(name, label, query)
    return {**variable, "datasource": LEDGER, "query": query, "allValue": ALL}


TENANT_VARIABLE_QUERY = (
    "SELECT k.name || ' (' || left(k.id::text, 8) || ')' AS __text, k.id::text AS __value "
    "FROM api_keys AS k WHERE EXISTS "
    "(SELECT FROM usage_ledger AS u WHERE u.api_key_id = k.id) ORDER BY 1"
)
LEDGER_MODEL_QUERY = "SELECT DISTINCT model FROM usage_ledger ORDER BY 1"


def tenants() -> Json:
    outcome_columns = ", ".join(f'sum(u.{o}_requests) AS "{o}"' for o in OUTCOMES)
    outcome_values = ", ".join(f"('{o}', u.{o}_requests)" for o in OUTCOMES)
    panels = [
        stat(
            "Prompt tokens from cache",
            "",
            "percentunit",
            "Cached prompt tokens / prompt tokens, as the backends reported them "
            "(usage.prompt_tokens_details.cached_tokens), chosen tenants together.",
            thresholds=[(None, "red"), (0.5, "orange"), (0.8, "green")],
            targets=[sql(f'SELECT {HIT_RATE} AS "hit rate" {LEDGER_ROWS}')],
            datasource=LEDGER,
        ),
        stat(
            "Lost prompt tokens",
            "",
            "short",
            "Prompt tokens the backends had to compute (prompt - cached): the latency the "
            "prefix cache did not save.",
            targets=[sql(f'SELECT {LOST} AS "lost" {LEDGER_ROWS}')],
            datasource=LEDGER,
        ),
        stat(
            "Requests",
            "",
            "short",
            "Answers the backends gave, every node together.",
            targets=[sql(f'SELECT sum(u.requests) AS "requests" {LEDGER_ROWS}')],
            datasource=LEDGER,
        ),
        stat(
            "Tenants",
            "",
            "short",
            "(API key, model) pairs with requests in the time range.",
            targets=[
                sql(f'SELECT count(DISTINCT (u.api_key_id, u.model)) AS "tenants" {LEDGER_ROWS}')
            ],
            datasource=LEDGER,
        ),
        timeseries(
            "Cache hit rate per tenant",
            [sql(per_tenant_hourly(HIT_RATE, "sum(u.prompt_tokens)"), "time_series")],
            "percentunit",
            "Per hour, the share of each tenant's prompt tokens found in the prefix cache "
            "(the 10 tenants with the most prompt tokens in the time range).",
            max_one=True,
            datasource=LEDGER,
        ),
        timeseries(
            "Lost prompt tokens per tenant",
            [sql(per_tenant_hourly(LOST, LOST), "time_series")],
            "short",
            "Per hour, the prompt tokens each tenant's backends had to compute (the 10 "
            "tenants losing the most in the time range).",
            datasource=LEDGER,
        ),
        table(
            "Tenants losing the most cache",
            f"SELECT k.name AS tenant, u.api_key_id::text AS key_id, u.model, "
            f"sum(u.requests) AS requests, sum(u.prompt_tokens) AS prompt_tokens, "
            f'{HIT_RATE} AS "hit rate", {LOST} AS lost_tokens, '
            f"count(DISTINCT u.backend) AS backends, sum(u.rebind_requests) AS rebinds, "
            f"sum(u.spill_requests) AS spills "
            f"FROM usage_ledger AS u JOIN api_keys AS k ON k.id = u.api_key_id "
            f"WHERE {WINDOW} AND {CHOSEN} "
            f"GROUP BY k.name, u.api_key_id, u.model "
            f"ORDER BY {LOST} DESC, sum(u.requests) DESC, u.api_key_id, u.model LIMIT 50",
            "Per (API key, model), most lost cache first: what `affinity-node usage` prints "
            "for the same window. A low hit rate with one backend: the workload (prompts "
            "that share little, or a cache too small for it); with several backends, or "
            "rebinds and spills: routing spread the tenant's prefix.",
            {"hit rate": "percentunit"},
        ),
        {
            "type": "barchart",
            "title": "Routing outcomes per tenant",
            "description": "What routing did for each tenant's requests (the 15 tenants with "
            "the most requests): hit on its backend, fanout (a hit on another member of its "
            "set), miss (new binding), rebind (its backend failed), spill (its backend was "
            "overloaded), degraded (no database), bypass (affinity off).",
            "datasource": LEDGER,
            "fieldConfig": {
                "defaults": {
                    "unit": "short",
                    "custom": {"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none"},
                },
                "overrides": [],
            },
            "options": {
                "orientation": "horizontal",
                "stacking": "normal",
                "xField": "tenant",
                "showValue": "never",
                "barWidth": 0.8,
                "groupWidth": 0.7,
                "xTickLabelRotation": 0,
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            },
            "targets": [
                sql(
                    f"{top_tenants('sum(u.requests)', 15)} "
                    f"SELECT {TENANT} AS tenant, {outcome_columns} "
                    "FROM usage_ledger AS u JOIN top USING (api_key_id, model) "
                    f"JOIN api_keys AS k ON k.id = u.api_key_id WHERE {WINDOW} "
                    "GROUP BY 1 ORDER BY sum(u.requests) DESC"
                )
            ],
            "_size": (12, 10),
        },
        timeseries(
            "Routing outcomes per hour",
            [
                sql(
                    f'SELECT u.hour_start AS "time", o.outcome AS metric, sum(o.n) AS value '
                    f"FROM usage_ledger AS u CROSS JOIN LATERAL (VALUES {outcome_values}) "
                    f"AS o (outcome, n) WHERE {WINDOW} AND {CHOSEN} "
                    "GROUP BY 1, 2 ORDER BY 1, 2",
                    "time_series",
                )
            ],
            "short",
            "The chosen tenants' requests per hour by routing outcome.",
            stack=True,
            height=10,
            datasource=LEDGER,
        ),
        table(
            "Tenants by backend",
            f"SELECT k.name AS tenant, u.model, u.backend, sum(u.requests) AS requests, "
            f'{HIT_RATE} AS "hit rate", {LOST} AS lost_tokens '
            f"FROM usage_ledger AS u JOIN api_keys AS k ON k.id = u.api_key_id "
            f"WHERE {WINDOW} AND {CHOSEN} "
            f"GROUP BY k.name, u.api_key_id, u.model, u.backend "
            f"ORDER BY sum(u.requests) DESC, u.api_key_id, u.model, u.backend LIMIT 100",
            "Where each tenant's requests went: a tenant spread over backends pays for its "
            "prefix on each (the hit rate per backend says where the cache worked).",
            {"hit rate": "percentunit"},
        ),
    ]
    return dashboard(
        "affinity-tenants",
        "Tenants",
        "The usage ledger per tenant (API key, model): prefix-cache hit rate over time, the "
        "tenants losing the most cache, and what routing did for them, from Postgres.",
        panels,
        variables=[
            _datasource_variable("grafana-postgresql-datasource", "Affinity ledger", LEDGER_UID),
            _sql_variable("tenant", "Tenant", TENANT_VARIABLE_QUERY),
            _sql_variable("model", "Model", LEDGER_MODEL_QUERY),
        ],
        time_from="now-24h",
        refresh="5m",
    )


DASHBOARDS: dict[str, Callable[[], Json]] = {
    "affinity-overview.json": overview,
    "affinity-traffic.json": traffic,
    "affinity-tenants.json": tenants,
}


def render(board: Json) -> str:
    return json.dumps(board, indent=2) + "\n"


def expressions(board: Json) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, PromQL) for every Prometheus query of every panel."""
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            if "expr" in t:
                yield panel["title"], t["refId"], t["expr"]


def sql_queries(board: Json) -> Iterator[tuple[str, str, str, str]]:
    """(panel title or variable name, refId, format, SQL) for every SQL query of a board,
    its template variables' included (as refId "variable")."""
    for var in board["templating"]["list"]:
        if var["type"] == "query" and var["datasource"] == LEDGER:
            yield var["name"], "variable", "table", var["query"]
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            if "rawSql" in t:
                yield panel["title"], t["refId"], t["format"], t["rawSql"]


def expand_sql(
    query: str, time_from: str, time_to: str, variables: dict[str, list[str] | None]
) -> str:
    """What Grafana sends for `query`: its time macros expanded (`time_from`, `time_to` as
    RFC 3339 UTC) and each variable's values quoted and joined, or ALL for None (All)."""
    out = query.replace("$__timeFrom()", f"'{time_from}'").replace("$__timeTo()", f"'{time_to}'")
    for name, values in variables.items():
        value = (
            ALL if values is None else ",".join("'" + v.replace("'", "''") + "'" for v in values)
        )
        out = out.replace(f"${name}", value)
    return out


def stale(directory: Path = DASHBOARD_DIR) -> list[str]:
    """The files in `directory` that differ from what this module builds."""
    out = []
    for name, build in DASHBOARDS.items():
        path = directory / name
        if not path.exists() or path.read_text() != render(build()):
            out.append(name)
    return out


def write(directory: Path = DASHBOARD_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        path = directory / name
        path.write_text(render(build()))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write or check grafana/dashboards/*.json.")
    parser.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    parser.add_argument("--dir", type=Path, default=DASHBOARD_DIR)
    args = parser.parse_args(argv)
    if args.check:
        names = stale(args.dir)
        for name in names:
            print(
                f"stale: {args.dir / name} (run python -m affinity_node.devtools.dashboards)",
                file=sys.stderr,
            )
        return 1 if names else 0
    for path in write(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
