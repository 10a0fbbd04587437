"""Metrics without a running node: series known up front, the scrape-time collector, exemplars."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from affinity_node.app import build_app
from affinity_node.config import (
    BackendConfig,
    DatabaseConfig,
    ModelConfig,
    NodeConfig,
    validate,
)
from affinity_node.http.state import BACKENDS, ENGINE, METRICS_REGISTRY
from affinity_node.observability.collector import OTHER_BACKEND, NodeCollector
from affinity_node.observability.metrics import (
    COMPLETION_CODES,
    EXEMPLAR_MAX_ID,
    AffinityMetrics,
    HttpMetrics,
    exemplar,
)
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.health_state import BackendHealth
from affinity_node.vocabulary import (
    DB_OPERATIONS,
    MISS_OUTCOMES,
    NOTIFY_OPS,
    REBIND_REASONS,
    REJECT_REASONS,
    SPILL_REASONS,
)


def _silent_listener() -> socket.socket:
    """Takes connections and never answers: a health probe waits out its timeout, longer than
    these tests run, without leaving the machine (an unroutable address did the same until
    something on this network answered it, and its 404 ejected the backends)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


_SILENT = [_silent_listener() for _ in range(3)]
B1, B2, B3 = (f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in _SILENT)


def config() -> NodeConfig:
    cfg = NodeConfig(
        node_id="n1",
        # Nothing listens there: the node starts degraded at once, which is all these need.
        database=DatabaseConfig(dsn="postgresql://127.0.0.1:9/db", startup_wait_seconds=0),
        backends=[
            BackendConfig(url=B1, models=["llama"]),
            BackendConfig(url=B2, models=["llama"]),
            BackendConfig(url=B3, models=["embed"], kind="external"),
        ],
        models=[ModelConfig(name="llama", aliases=["meta/llama"]), ModelConfig(name="qwen")],
    )
    validate(cfg)
    return cfg


@asynccontextmanager
async def started(app: web.Application) -> AsyncIterator[web.Application]:
    """The node's resources without a listening socket."""
    app.on_startup.freeze()  # as web.AppRunner does: state is set during startup
    await app.startup()
    app.freeze()
    try:
        yield app
    finally:
        await app.cleanup()


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def has(found: dict, name: str, **labels: str) -> bool:
    return (name, frozenset(labels.items())) in found


async def test_label_sets_known_up_front_exist_at_zero_before_any_traffic():
    async with started(build_app(config())) as app:
        found = samples(app[METRICS_REGISTRY])
    for outcome in MISS_OUTCOMES:
        assert (
            found[
                (
                    "affinity_cache_misses_total",
                    frozenset({("model", "llama"), ("outcome", outcome)}),
                )
            ]
            == 0
        )
    assert has(found, "affinity_cache_hits_total", model="llama")
    for reason in REBIND_REASONS:
        assert has(found, "affinity_rebinds_total", model="llama", reason=reason)
    for spill in SPILL_REASONS:
        assert has(found, "affinity_spills_total", model="llama", reason=spill)
    for reason in REJECT_REASONS:
        assert has(found, "affinity_notifications_rejected_total", reason=reason)
    # Only models affinity applies to: "embed" is served by an external backend only, and
    # "qwen" has no backend (yet).
    assert not any(
        dict(labels).get("model") in ("embed", "qwen")
        for name, labels in found
        if name.startswith("affinity_cache_")
    )
    for op in NOTIFY_OPS:
        assert has(found, "affinity_notifications_total", op=op)
    for operation in DB_OPERATIONS:
        assert has(found, "affinity_db_errors_total", operation=operation)
    for backend in (B1, B2, B3):
        assert has(found, "affinity_upstream_ttft_seconds_count", backend=backend)
        assert has(found, "affinity_upstream_requests_total", backend=backend, code="200")
        assert has(found, "affinity_upstream_inflight", backend=backend)
        assert found[("affinity_backend_healthy", frozenset({("backend", backend)}))] == 1
    for code in COMPLETION_CODES:
        assert has(found, "affinity_http_requests_total", route="/v1/chat/completions", code=code)
    assert has(found, "affinity_http_request_duration_seconds_count", route="/metrics")
    assert not [k for k in found if k[0].endswith("_created")]  # disabled: half the series


async def test_collector_counts_bindings_per_backend_at_scrape_time():
    cfg = config()
    async with started(build_app(cfg)) as app:
        pool = app[BACKENDS]
        assert (
            app[METRICS_REGISTRY].get_sample_value("affinity_cache_bindings", {"backend": B1}) == 0
        )
        assert app[ENGINE].cache is not None
    registry = CollectorRegistry()
    cache = BindingCache()
    collector = NodeCollector(
        pool,
        cache,
        AffinityMetrics(registry),
        HttpMetrics(registry, "t"),
        [m.name for m in cfg.models],
    )
    registry.register(collector)
    found = samples(registry)
    assert found[("affinity_cache_bindings", frozenset({("backend", B1)}))] == 0
    for i, backend in enumerate([B1, B1, B2, "http://gone:8000"]):
        cache.fill((uuid.uuid4(), "llama"), backend, i + 1, 60.0, cache.stamp(), 0.0)
    found = samples(registry)
    bindings = {
        dict(labels)["backend"]: v
        for (name, labels), v in found.items()
        if name == "affinity_cache_bindings"
    }
    assert bindings == {B1: 2, B2: 1, B3: 0, OTHER_BACKEND: 1}
    healthy = {
        dict(labels)["model"]: v
        for (name, labels), v in found.items()
        if name == "affinity_model_healthy_backends"
    }
    assert healthy == {"llama": 2, "embed": 1, "qwen": 0}


def test_collector_follows_health_and_learned_models():
    registry = CollectorRegistry()
    pool = BackendPool(
        [BackendSpec(B1, "vllm", ("llama",)), BackendSpec(B2, "vllm", ())], [ModelSpec("llama")]
    )
    health = BackendHealth(pool, eject_after_failures=1)
    affinity = AffinityMetrics(registry)
    registry.register(NodeCollector(pool, BindingCache(), affinity, HttpMetrics(registry, "t")))
    health.request_failed(pool.backends[0], "test")  # ejected at once (threshold 1)
    found = samples(registry)
    assert found[("affinity_model_healthy_backends", frozenset({("model", "llama")}))] == 0
    # A model learned from a backend's /v1/models gets its series on the next scrapes.
    pool.set_models(pool.backends[1], ["mistral"])  # as discovery does
    samples(registry)
    found = samples(registry)
    assert has(found, "affinity_cache_misses_total", model="mistral", outcome="created")


def test_exemplars_carry_the_request_id_in_openmetrics_only():
    registry = CollectorRegistry()
    http = HttpMetrics(registry, "t")
    http.duration.labels("/v1/chat/completions").observe(0.2, exemplar("req-42"))
    long_id = "x" * 128  # the longest id the proxy accepts from a client
    http.upstream_ttft.labels(B1).observe(0.03, exemplar(long_id))  # must not raise
    assert len(exemplar(long_id)["request_id"]) == EXEMPLAR_MAX_ID
    om = openmetrics(registry).decode()
    assert '# {request_id="req-42"} 0.2' in om
    assert f'# {{request_id="{"x" * EXEMPLAR_MAX_ID}"}} 0.03' in om
    assert "request_id" not in generate_latest(registry).decode()
