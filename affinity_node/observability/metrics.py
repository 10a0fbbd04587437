"""Prometheus metrics of one node, on a registry of its own (several nodes can share a process).

Counters and histograms are per node; dashboards aggregate with `sum by`. Labels never carry
API keys or key ids: `model` holds canonical names (from the config or learned from backends),
`backend` the normalised backend URL, `route` a known path or "other". Bucket edges include
every SLO threshold.

Label sets known up front (miss outcomes and rebind reasons per model, notification ops, the
database operations, TTFT per backend) are created at zero, so that dashboards and alerts have
series from the first scrape and `rate()` sees the first increment.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from affinity_node.observability.lockfree import FastCounter, FastHistogram, FastHistogramChild
from affinity_node.vocabulary import (
    DB_OPERATIONS,
    EVICT_REASONS,
    FANOUT_DIRECTIONS,
    FANOUT_REASONS,
    KEY_LOOKUP_REASONS,
    KEY_REFUSALS,
    LEDGER_DROPS,
    LIMIT_KINDS,
    MISS_OUTCOMES,
    MOVE_REASONS,
    NOTIFY_OPS,
    REBIND_REASONS,
    REJECT_REASONS,
    RESYNC_MODES,
    SPILL_REASONS,
    EvictReason,
    LimitKind,
)

# `_created` series double the series count of every counter and histogram, and nothing here
# reads them. (Process-wide: prometheus-client keeps this switch global.)
disable_created_metrics()  # type: ignore[no-untyped-call]

COMPLETION_CODES: Final = (
    "200", "400", "401", "404", "413", "429", "499", "500", "502", "503"
)  # fmt: skip
"""What the completion routes answer (the proxy's own errors and the usual upstream ones)."""

EXEMPLAR_EVERY: Final = 16
"""Latency observations carry an exemplar once in this many requests."""

EXEMPLAR_MAX_ID: Final = 100
"""An exemplar's label set is at most 128 characters: longer request ids are cut."""


def exemplar(request_id: str) -> dict[str, str]:
    """The exemplar attached to latency observations: which request to look up in the logs."""
    return {"request_id": request_id[:EXEMPLAR_MAX_ID]}


EXEMPLAR_MAX_TRACED_ID: Final = 128 - len("trace_id") - 32 - len("request_id")
"""The request id's part kept beside a trace id."""


def add_trace_id(exemplar: dict[str, str], trace_id: str) -> None:
    """The exemplar names its trace too (Grafana links `trace_id` to the trace); the request id
    is cut so the labels stay within 128 characters."""
    exemplar["trace_id"] = trace_id
    exemplar["request_id"] = exemplar["request_id"][:EXEMPLAR_MAX_TRACED_ID]


# 100 us .. 5 s: lock waits are normally sub-millisecond; the SLO edges are 1, 10, 100 ms.
LOCK_WAIT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
# Notification lag: commit to callback, normally a few milliseconds on a LAN.
NOTIFY_LAG_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


# Queue waits: part of the time to first token, so the same SLO edges (25 ms up) and longer.
QUEUE_WAIT_BUCKETS = (0.005, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Kind = Literal["counter", "gauge", "histogram", "fast_counter", "fast_histogram"]


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric: where it goes on its holder, what Prometheus calls it, and the label values
    created at zero (so dashboards have series from the first scrape)."""

    attr: str
    kind: Kind
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    zero: tuple[tuple[str, ...], ...] = ()


def _each(values: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    return tuple((v,) for v in values)


def declare(holder: object, specs: Iterable[Spec], metrics_registry: CollectorRegistry) -> None:
    """Sets one attribute of `holder` per spec (the holder's class annotates its type)."""
    for spec in specs:
        metric: Any
        if spec.kind == "counter":
            metric = Counter(spec.name, spec.help, spec.labels, registry=metrics_registry)
        elif spec.kind == "gauge":
            metric = Gauge(spec.name, spec.help, spec.labels, registry=metrics_registry)
        elif spec.kind == "histogram":
            metric = Histogram(
                spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=metrics_registry
            )
        elif spec.kind == "fast_counter":
            metric = FastCounter(spec.name, spec.help, list(spec.labels), registry=metrics_registry)
        else:
            metric = FastHistogram(
                spec.name,
                spec.help,
                list(spec.labels),
                buckets=spec.buckets,
                registry=metrics_registry,
            )
        for values in spec.zero:
            metric.labels(*values)
        setattr(holder, spec.attr, metric)


AFFINITY_SPECS: Final = (
    Spec("cache_hits", "fast_counter", "affinity_cache_hits",
         "Resolves answered from the node's cache, no database.", ("model",)),
    Spec("cache_misses", "counter", "affinity_cache_misses",
         "Resolves that needed the database, by how they ended.", ("model", "outcome")),
    Spec("lock_wait", "histogram", "affinity_lock_wait_seconds",
         "Time a cold miss waited for the pair's advisory lock.", buckets=LOCK_WAIT_BUCKETS),
    Spec("rebinds", "counter", "affinity_rebinds",
         "Bindings moved to another backend, by reason.", ("model", "reason")),
    Spec("spills", "counter", "affinity_spills",
         "Requests served past their bound backend while the binding stayed, by reason "
         "(load: over the load bound; failover: it failed but is not unhealthy).",
         ("model", "reason")),
    Spec("cache_entries", "gauge", "affinity_cache_entries",
         "Bindings held in this node's cache."),
    Spec("notifications", "counter", "affinity_notifications",
         "Binding change notifications received, by operation.", ("op",),
         zero=_each(NOTIFY_OPS)),
    Spec("moves", "counter", "affinity_moves",
         "Bindings the fleet's mover moved (paced fleet-wide), by reason.", ("reason",),
         zero=_each(MOVE_REASONS)),
    Spec("fanout_changes", "counter", "affinity_fanout_changes",
         "Binding sets grown or shrunk (load-aware fan-out), by direction and reason.",
         ("model", "direction", "reason")),
    Spec("notifications_rejected", "counter", "affinity_notifications_rejected",
         "Binding notifications not believed (treated as invalidations), by reason.",
         ("reason",), zero=_each(REJECT_REASONS)),
    Spec("key_lookups", "counter", "affinity_key_lookups",
         "Database statements the API key cache ran, by why "
         "(unknown: a token while out of sync; created: a new key's notification; "
         "verify: a revocation checked against the table; "
         "poll: revocations polled while the listener is down).",
         ("reason",), zero=_each(KEY_LOOKUP_REASONS)),
    Spec("keys_refused", "counter", "affinity_keys_refused",
         "Bearer tokens refused, by why (unknown or revoked; rate_limited or unavailable: "
         "not known and not checkable right now, answered 503).",
         ("reason",), zero=_each(KEY_REFUSALS)),
    Spec("notify_lag", "histogram", "affinity_notify_lag_seconds",
         "From the trigger to the node's cache (database clock, offset-corrected).",
         buckets=NOTIFY_LAG_BUCKETS),
    Spec("listener_up", "gauge", "affinity_listener_up",
         "1 while the LISTEN connection is healthy and synced."),
    Spec("listener_reconnects", "counter", "affinity_listener_reconnects",
         "Times the listener connection was re-established."),
    Spec("listener_failures", "counter", "affinity_listener_failures",
         "What ended a listener connection or an attempt at one, by kind (database: lost, "
         "refused or a failed probe; internal: an exception of the node's own).",
         ("kind",), zero=_each(("database", "internal"))),
    Spec("cache_resyncs", "counter", "affinity_cache_resyncs",
         "Resyncs of the cache after LISTEN (catch-ups and full snapshots)."),
    Spec("resync_rows", "counter", "affinity_cache_resync_rows",
         "Rows read by resyncs, by mode (incremental: what changed since the node's "
         "watermark; full: every live binding, in pages).",
         ("mode",), zero=_each(RESYNC_MODES)),
    Spec("cache_evictions", "counter", "affinity_cache_evictions",
         "Entries that left the cache on their own, by reason (size: live bindings pushed "
         "out by affinity.cache_max_entries; expired: past their deadline).",
         ("reason",), zero=_each(EVICT_REASONS)),
    Spec("refresh_writes", "counter", "affinity_refresh_writes",
         "Batched TTL refresh statements written."),
    Spec("db_errors", "counter", "affinity_db_errors",
         "Database operations that failed or timed out.", ("operation",),
         zero=_each(DB_OPERATIONS)),
    Spec("db_up", "gauge", "affinity_db_up",
         "1 while the last database operation succeeded."),
    Spec("ratelimited", "counter", "affinity_ratelimited",
         "Requests refused (429) by a fleet-wide per-key limit, by model and limit "
         "(rpm, tpm, concurrent).", ("model", "limit")),
    Spec("queue_depth", "gauge", "affinity_queue_depth",
         "Requests waiting in this node's fair queue (every backend of the model saturated), "
         "by model and priority class.", ("model", "priority")),
    Spec("queue_wait", "histogram", "affinity_queue_wait_seconds",
         "Time requests released from the fair queue waited in it.", ("model",),
         buckets=QUEUE_WAIT_BUCKETS),
)  # fmt: skip
"""The affinity engine's metrics (names fixed by the Contract in DESIGN.md)."""


class AffinityMetrics:
    """The affinity engine's metrics: AFFINITY_SPECS on `metrics_registry`."""

    cache_hits: FastCounter
    cache_misses: Counter
    lock_wait: Histogram
    rebinds: Counter
    spills: Counter
    cache_entries: Gauge
    notifications: Counter
    moves: Counter
    fanout_changes: Counter
    notifications_rejected: Counter
    key_lookups: Counter
    keys_refused: Counter
    notify_lag: Histogram
    listener_up: Gauge
    listener_reconnects: Counter
    listener_failures: Counter
    cache_resyncs: Counter
    resync_rows: Counter
    cache_evictions: Counter
    refresh_writes: Counter
    db_errors: Counter
    db_up: Gauge
    ratelimited: Counter
    queue_depth: Gauge
    queue_wait: Histogram

    def __init__(self, metrics_registry: CollectorRegistry) -> None:
        self.metrics_registry = metrics_registry
        declare(self, AFFINITY_SPECS, metrics_registry)
        self._models: set[str] = set()
        self._evictions = {r: self.cache_evictions.labels(r).inc for r in EVICT_REASONS}

    def evicted(self, reason: EvictReason, n: int) -> None:
        """The binding cache's `on_evict` (given when the cache is built)."""
        self._evictions[reason](n)

    def init_models(self, models: Iterable[str]) -> None:
        """Create the per-model series at zero (idempotent; cheap when nothing is new)."""
        for model in models:
            if model in self._models:
                continue
            self._models.add(model)
            self.cache_hits.labels(model)
            for outcome in MISS_OUTCOMES:
                self.cache_misses.labels(model, outcome)
            for reason in REBIND_REASONS:
                self.rebinds.labels(model, reason)
            for spill in SPILL_REASONS:
                self.spills.labels(model, spill)
            for direction in FANOUT_DIRECTIONS:
                for why in FANOUT_REASONS:
                    self.fanout_changes.labels(model, direction, why)
            for kind in LIMIT_KINDS:
                self.ratelimited.labels(model, kind)
            self.queue_depth.labels(model, "0")
            self.queue_wait.labels(model)

    def count_ratelimited(self, model: str, kind: LimitKind) -> None:
        self.ratelimited.labels(model, kind).inc()

    def queue_changed(self, model: str, priority: int, change: int) -> None:
        """The fair queue's `on_depth`."""
        self.queue_depth.labels(model, str(priority)).inc(change)

    def queue_waited(self, model: str, seconds: float) -> None:
        """The fair queue's `on_wait`."""
        self.queue_wait.labels(model).observe(seconds)


LEDGER_SPECS: Final = (
    Spec("writes", "counter", "affinity_ledger_writes",
         "Usage ledger batches added to the database (one statement each)."),
    Spec("dropped", "counter", "affinity_ledger_dropped_requests",
         "Requests counted by the node that never reached the ledger table, by why "
         "(full: memory bound reached while the database was away; rejected: the "
         "database refused the batch; shutdown: stopped with the database unreachable).",
         ("reason",), zero=_each(LEDGER_DROPS)),
    Spec("unreported_family", "fast_counter", "affinity_ledger_unreported",
         "Successful answers without a readable usage (ledgered as requests without "
         "tokens): a backend that does not report it, a compressed or cut stream."),
    Spec("pending", "gauge", "affinity_ledger_pending_rows",
         "Ledger rows counted in memory and not written yet."),
)  # fmt: skip


class LedgerMetrics:
    """The usage ledger's own health (its figures per tenant are in the database, never in
    labels). Flush failures count in `affinity_db_errors_total{operation="ledger"}`."""

    writes: Counter
    dropped: Counter
    unreported_family: FastCounter
    pending: Gauge

    def __init__(self, metrics_registry: CollectorRegistry, db_errors: Counter) -> None:
        declare(self, LEDGER_SPECS, metrics_registry)
        self.unreported = self.unreported_family.labels()
        self.flush_errors = db_errors.labels("ledger")


# Request latency and TTFT: SLO edges at 25 ms, 100 ms, 250 ms, 1 s, 2.5 s, 10 s.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# What the node itself adds: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


HTTP_SPECS: Final = (
    Spec("requests", "fast_counter", "affinity_http_requests",
         "HTTP requests answered by this node, by route and status.", ("route", "code")),
    Spec("duration", "fast_histogram", "affinity_http_request_duration_seconds",
         "Time to answer, last byte included.", ("route",), buckets=LATENCY_BUCKETS),
    Spec("overhead", "fast_histogram", "affinity_proxy_overhead_seconds",
         "Time the node adds: everything but waiting for the upstream.",
         buckets=OVERHEAD_BUCKETS),
    Spec("upstream_requests", "fast_counter", "affinity_upstream_requests",
         "Requests forwarded to backends, by upstream status.", ("backend", "code")),
    Spec("upstream_ttft", "fast_histogram", "affinity_upstream_ttft_seconds",
         "From forwarding to the first body byte received.", ("backend",),
         buckets=TTFT_BUCKETS),
    Spec("build_info", "gauge", "affinity_build_info",
         "Always 1; the version label says which build runs.", ("version",)),
    Spec("config_info", "gauge", "affinity_config_info",
         "Always 1; the hash label names the configuration in effect (a reload changes it).",
         ("hash",)),
)  # fmt: skip


class HttpMetrics:
    """The proxy's request and upstream metrics (names fixed by the Contract)."""

    requests: FastCounter
    duration: FastHistogram
    overhead: FastHistogram
    upstream_requests: FastCounter
    upstream_ttft: FastHistogram
    build_info: Gauge
    config_info: Gauge

    def __init__(self, metrics_registry: CollectorRegistry, version: str) -> None:
        declare(self, HTTP_SPECS, metrics_registry)
        self.build_info.labels(version).set(1)
        self._config_hash: str | None = None
        self._backends: set[str] = set()
        # Labelled children looked up once, not per request (.labels() hashes and locks).
        self._request_children: dict[tuple[str, str], Callable[[], None]] = {}
        self._duration_children: dict[str, FastHistogramChild] = {}
        self._upstream_children: dict[tuple[str, str], Callable[[], None]] = {}
        self._ttft_children: dict[str, FastHistogramChild] = {}
        self._duration_samples: dict[str, itertools.count[int]] = {}
        self._ttft_sample = itertools.count()

    def show_config(self, config_hash: str) -> None:
        """One series at a time: the previous hash's goes (so the label stays bounded)."""
        if self._config_hash is not None and self._config_hash != config_hash:
            self.config_info.remove(self._config_hash)
        self._config_hash = config_hash
        self.config_info.labels(config_hash).set(1)

    def duration_exemplar(self, route: str, request_id: str) -> dict[str, str] | None:
        """An exemplar for 1 request in EXEMPLAR_EVERY per route (the first included): each
        bucket keeps only its latest exemplar anyway, and building one per request costs ~5%
        of the node's CPU. Per route, so scrapes of /metrics do not take the API's turns."""
        sample = self._duration_samples.get(route)
        if sample is None:
            sample = self._duration_samples[route] = itertools.count()
        return None if next(sample) % EXEMPLAR_EVERY else exemplar(request_id)

    def ttft_exemplar(self, request_id: str) -> dict[str, str] | None:
        return None if next(self._ttft_sample) % EXEMPLAR_EVERY else exemplar(request_id)

    def count_request(self, route: str, code: str) -> None:
        inc = self._request_children.get((route, code))
        if inc is None:
            inc = self._request_children[(route, code)] = self.requests.labels(route, code).inc
        inc()

    def observe_duration(self, route: str, seconds: float, ex: dict[str, str] | None) -> None:
        child = self._duration_children.get(route)
        if child is None:
            child = self._duration_children[route] = self.duration.labels(route)
        child.observe(seconds, ex)

    def count_upstream(self, backend: str, code: str) -> None:
        inc = self._upstream_children.get((backend, code))
        if inc is None:
            inc = self._upstream_children[(backend, code)] = self.upstream_requests.labels(
                backend, code
            ).inc
        inc()

    def observe_ttft(self, backend: str, seconds: float, ex: dict[str, str] | None) -> None:
        child = self._ttft_children.get(backend)
        if child is None:
            child = self._ttft_children[backend] = self.upstream_ttft.labels(backend)
        child.observe(seconds, ex)

    def init_routes(self, routes: Iterable[str], completion_routes: Iterable[str] = ()) -> None:
        """Duration series for every route; request counters at zero for the answers the
        completion routes give, so that `rate()` sees even the first error of a kind."""
        for route in routes:
            self.duration.labels(route)
        for route in completion_routes:
            for code in COMPLETION_CODES:
                self.requests.labels(route, code)

    def forget_backend(self, backend: str) -> None:
        """A backend left: its series go (DNS churn would grow them without bound). Its cached
        children go first, so no request path holds one of a removed series."""
        self._backends.discard(backend)
        for key in [k for k in self._upstream_children if k[0] == backend]:
            del self._upstream_children[key]
        self._ttft_children.pop(backend, None)
        for labels in self.upstream_requests.label_sets():
            if labels[0] == backend:
                self.upstream_requests.remove(*labels)
        self.upstream_ttft.remove(backend)

    def init_backends(self, backends: Iterable[str]) -> None:
        """TTFT and request series at zero for every backend, so per-backend panels list them
        all and `rate()` counts their first requests."""
        for backend in backends:
            if backend not in self._backends:
                self._backends.add(backend)
                self.upstream_ttft.labels(backend)
                self.upstream_requests.labels(backend, "200")
