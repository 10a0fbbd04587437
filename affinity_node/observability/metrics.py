"""Prometheus metrics of one node, on a registry of its own (several nodes can share a process).

Counters and histograms are per node; dashboards aggregate with `sum by`. Labels never carry
API keys or key ids. Bucket edges include every SLO threshold.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 100 us .. 5 s: lock waits are normally sub-millisecond; the SLO edges are 1, 10, 100 ms.
LOCK_WAIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# Notification lag: commit to callback, normally a few milliseconds on a LAN.
NOTIFY_LAG_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)


class AffinityMetrics:
    """The affinity engine's metrics (names fixed by the Contract in DESIGN.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.cache_hits = Counter(
            "affinity_cache_hits", "Resolves answered from the node's cache, no database.",
            ["model"], registry=registry,
        )
        self.cache_misses = Counter(
            "affinity_cache_misses", "Resolves that needed the database, by how they ended.",
            ["model", "outcome"], registry=registry,
        )
        self.lock_wait = Histogram(
            "affinity_lock_wait_seconds", "Time a cold miss waited for the pair's advisory lock.",
            buckets=LOCK_WAIT_BUCKETS, registry=registry,
        )
        self.rebinds = Counter(
            "affinity_rebinds", "Bindings moved to another backend, by reason.",
            ["model", "reason"], registry=registry,
        )
        self.spills = Counter(
            "affinity_spills", "Requests sent past an overloaded bound backend (binding kept).",
            ["model"], registry=registry,
        )
        self.cache_entries = Gauge(
            "affinity_cache_entries", "Bindings held in this node's cache.", registry=registry,
        )
        self.notifications = Counter(
            "affinity_notifications", "Binding change notifications received, by operation.",
            ["op"], registry=registry,
        )
        self.notify_lag = Histogram(
            "affinity_notify_lag_seconds",
            "From the trigger to the node's cache (database clock, offset-corrected).",
            buckets=NOTIFY_LAG_BUCKETS, registry=registry,
        )
        self.listener_up = Gauge(
            "affinity_listener_up", "1 while the LISTEN connection is healthy and synced.",
            registry=registry,
        )
        self.listener_reconnects = Counter(
            "affinity_listener_reconnects", "Times the listener connection was re-established.",
            registry=registry,
        )
        self.cache_resyncs = Counter(
            "affinity_cache_resyncs", "Full reloads of the cache from a database snapshot.",
            registry=registry,
        )
        self.refresh_writes = Counter(
            "affinity_refresh_writes", "Batched TTL refresh statements written.",
            registry=registry,
        )
        self.db_errors = Counter(
            "affinity_db_errors", "Database operations that failed or timed out.",
            ["operation"], registry=registry,
        )
        self.db_up = Gauge(
            "affinity_db_up", "1 while the last database operation succeeded.", registry=registry,
        )


# Request latency and TTFT: SLO edges at 25 ms, 100 ms, 250 ms, 1 s, 2.5 s, 10 s.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# What the node itself adds: tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)


class HttpMetrics:
    """The proxy's request and upstream metrics (names fixed by the Contract)."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        self.requests = Counter(
            "affinity_http_requests", "HTTP requests answered by this node, by route and status.",
            ["route", "code"], registry=registry,
        )
        self.duration = Histogram(
            "affinity_http_request_duration_seconds", "Time to answer, last byte included.",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.overhead = Histogram(
            "affinity_proxy_overhead_seconds",
            "Time the node adds: everything but waiting for the upstream.",
            buckets=OVERHEAD_BUCKETS, registry=registry,
        )
        self.upstream_requests = Counter(
            "affinity_upstream_requests", "Requests forwarded to backends, by upstream status.",
            ["backend", "code"], registry=registry,
        )
        self.upstream_ttft = Histogram(
            "affinity_upstream_ttft_seconds", "From forwarding to the first body byte received.",
            ["backend"], buckets=TTFT_BUCKETS, registry=registry,
        )
        self.upstream_inflight = Gauge(
            "affinity_upstream_inflight", "Requests in flight to each backend (streams included).",
            ["backend"], registry=registry,
        )
        self.backend_healthy = Gauge(
            "affinity_backend_healthy", "1 while the backend is in rotation.",
            ["backend"], registry=registry,
        )
        self.build_info = Gauge(
            "affinity_build_info", "Always 1; the version label says which build runs.",
            ["version"], registry=registry,
        )
        self.build_info.labels(version).set(1)
