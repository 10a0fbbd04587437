"""The composition root: builds one node from its config. Nothing else imports adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from uuid import UUID

import aiohttp
import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from affinity_node import __version__
from affinity_node.auth.keycache import KeyCache
from affinity_node.config import NodeConfig
from affinity_node.http.middleware import COMPLETION_ROUTES, KNOWN_ROUTES, openai_errors
from affinity_node.http.ops import REGISTRY, healthz, metrics, models, readyz
from affinity_node.http.proxy import handle_completion
from affinity_node.http.state import NODE, NodeState
from affinity_node.observability.collector import NodeCollector
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.routing.engine import EngineSettings
from affinity_node.routing.pool import Backend, BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.router import AffinityRules, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store import keys as key_store
from affinity_node.store.events import parse_key_event
from affinity_node.wiring import KEYS_CHANNEL, EngineConfig, running_engine

log = logging.getLogger(__name__)


def build_app(cfg: NodeConfig, registry: CollectorRegistry | None = None) -> web.Application:
    registry = registry or CollectorRegistry()
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        middlewares=[openai_errors],
        handler_args={"max_field_size": 16384, "max_headers": 64},
    )
    pool = BackendPool(
        [BackendSpec(b.url, b.kind, tuple(b.models)) for b in cfg.backends],
        [ModelSpec(m.name, tuple(m.aliases), m.affinity) for m in cfg.models],
        eject_after_failures=cfg.health.eject_after_failures,
        readmit_after_successes=cfg.health.readmit_after_successes,
    )
    http_metrics = HttpMetrics(registry, __version__)
    node = NodeState(cfg, pool, http_metrics, AffinityMetrics(registry))
    for backend in pool.backends:
        http_metrics.backend_healthy.labels(backend.id).set(1 if backend.healthy else 0)
        http_metrics.upstream_inflight.labels(backend.id).set_function(_inflight_of(backend))
    pool.on_health_change = lambda bid, ok: http_metrics.backend_healthy.labels(bid).set(int(ok))
    http_metrics.init_routes(sorted(KNOWN_ROUTES), sorted(COMPLETION_ROUTES))
    registry.register(NodeCollector(
        pool, lambda: node.engine.cache if node.engine is not None else None,
        node.affinity_metrics, http_metrics, [m.name for m in cfg.models],
    ))
    app[NODE] = node
    app[REGISTRY] = registry
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(_engine)
    app.cleanup_ctx.append(_health_checks)
    app.router.add_post("/v1/chat/completions", handle_completion)
    app.router.add_post("/v1/completions", handle_completion)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def _inflight_of(backend: Backend) -> Callable[[], float]:
    return lambda: float(backend.inflight)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    limits = node.config.limits
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=10)
    node.session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=limits.upstream_connect_timeout_seconds,
            sock_read=limits.upstream_read_timeout_seconds,
        ),
    )
    yield
    await node.session.close()


async def _engine(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    cfg = node.config
    pool_ref: list[asyncpg.Pool] = []

    async def lookup(digest: bytes) -> tuple[UUID, bool] | None:
        return await key_store.lookup_hash(pool_ref[0], digest)

    async def snapshot() -> list[tuple[bytes, UUID]]:
        return await key_store.active_hashes(pool_ref[0])

    keys = KeyCache(lookup, snapshot)

    def on_key_event(payload: str) -> None:
        event = parse_key_event(payload)
        if event is not None:
            keys.on_event(*event)


    engine_cfg = EngineConfig(
        dsn=cfg.database.dsn,
        node_id=cfg.node_id,
        pool_max=cfg.database.pool_max,
        statement_timeout_ms=cfg.database.statement_timeout_ms,
        cache_max_entries=cfg.affinity.cache_max_entries,
        startup_sync_timeout_s=cfg.database.startup_wait_seconds,
        engine=replace(
            EngineSettings(),
            ttl_seconds=cfg.affinity.ttl_seconds,
            refresh_flush_interval_s=cfg.affinity.refresh_flush_interval_seconds,
        ),
    )
    async with running_engine(
        engine_cfg,
        registry=app[REGISTRY],
        metrics=node.affinity_metrics,
        extra_channels={KEYS_CHANNEL: on_key_event},
        extra_resync=(keys.resync,),
        on_pool=pool_ref.append,
        store_kind=cfg.affinity.store,
    ) as running:
        node.engine = running.engine
        node.keys = keys
        node.router = Router(
            node.pool,
            make_strategy(cfg.routing.fallback),
            running.engine,
            AffinityRules(cfg.affinity.enabled, cfg.affinity.load_factor,
                          cfg.affinity.spill_min_gap),
            node.affinity_metrics,
        )
        yield
        node.draining = True


async def _health_checks(app: web.Application) -> AsyncIterator[None]:
    node = app[NODE]
    assert node.session is not None
    await node.pool.discover(node.session)
    task = asyncio.create_task(
        node.pool.run_health_checks(
            node.session,
            node.config.health.interval_seconds,
            node.config.health.eject_after_failures,
            node.config.health.readmit_after_successes,
        ),
        name="health-checks",
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class RunningNode:
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def state(self) -> NodeState:
        return self.app[NODE]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def drain(self, timeout: float) -> bool:
        """Stop taking work; wait for requests in progress. True when all finished."""
        state = self.state
        state.draining = True
        if state.active == 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await state.idle.wait()
        return state.active == 0


@asynccontextmanager
async def run_node(cfg: NodeConfig) -> AsyncIterator[RunningNode]:
    app = build_app(cfg)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        yield RunningNode(app, runner, port)
    finally:
        await runner.cleanup()


async def serve(cfg: NodeConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new work, finish streams, flush."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_node(cfg) as node:
        log.info("node %s listening on %s:%d", cfg.node_id, cfg.listen.host, node.port)
        await stop.wait()
        log.info("draining (up to %.0fs)", cfg.limits.drain_timeout_seconds)
        finished = await node.drain(cfg.limits.drain_timeout_seconds)
        if not finished:
            log.warning("drain timeout: %d request(s) still open", node.state.active)
    log.info("stopped")
