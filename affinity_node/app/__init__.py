"""The composition root: the one place that builds a node from its config. It wires; what
runs lives with its concern (periodic duties are started through affinity_node/tasks.py).

The node's resources are one aiohttp cleanup context (`resources.node_resources`), started
in dependency order and stopped in reverse: database pool -> usage ledger -> key cache ->
upstream client -> backend pool and health checks -> affinity engine (binding store,
listener, engine; the registry follower keeps the backend pool equal to the registry) ->
router -> the node's fleet duties (health reports, NOTIFY queue, DNS, the mover). Each
publishes what the handlers read under one typed key (http/state.py), so handlers read
ready, non-optional state. Only this package and the CLI import the adapters (store/); the
CLI and the tests build their pieces with the same builders (`database_pool`,
`affinity_engine`, `postgres_bindings`, `usage_ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from aiohttp import web
from prometheus_client import CollectorRegistry

from affinity_node import __version__
from affinity_node.app.builders import (
    EngineSpec,
    EngineStack,
    affinity_engine,
    database_pool,
    engine_spec,
    postgres_bindings,
    usage_ledger,
)
from affinity_node.app.reload import reload_config
from affinity_node.app.resources import node_resources
from affinity_node.auth.keycache import KeyCache
from affinity_node.config import NodeConfig, config_hash
from affinity_node.http.api import handler
from affinity_node.http.endpoints import ENDPOINTS
from affinity_node.http.ops import debug_bindings, healthz, metrics, models, readyz
from affinity_node.http.state import (
    ACCESS_LOG,
    AFFINITY_METRICS,
    BACKENDS,
    CONFIG,
    ENGINE,
    HTTP_METRICS,
    KEYS,
    METRICS_REGISTRY,
    NODE,
    STATUS,
    TRACING,
    NodeStatus,
)
from affinity_node.http.wrapper import OPS_ROUTES, RouteSpec, add_routes
from affinity_node.observability.logs import AccessLog, KeyRefs, NullAccessLog
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.observability.tracing import NullTracing, make_tracing
from affinity_node.routing.backends import BackendPool
from affinity_node.routing.engine import AffinityEngine
from affinity_node.upstream.discovery import Resolver, system_resolver

__all__ = [
    "SHUTDOWN_GRACE_SECONDS",
    "EngineSpec",
    "EngineStack",
    "RunningNode",
    "affinity_engine",
    "api_routes",
    "build_app",
    "build_ops_app",
    "database_pool",
    "engine_spec",
    "postgres_bindings",
    "run_node",
    "serve",
    "usage_ledger",
]

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 2.0
"""After the drain (`serve`), what aiohttp still grants open handlers before cancelling them:
the drain already waited `limits.drain_timeout_seconds`, so the exit is not delayed further
(aiohttp's own default is 60 s, which would outlast the platform's grace period)."""


async def _start_draining(app: web.Application) -> None:
    """Shutdown began: /readyz says so while the resources stop."""
    app[STATUS].draining = True


def _ops_routes(cfg: NodeConfig) -> list[RouteSpec]:
    routes = [
        RouteSpec("GET", "/healthz", healthz),
        RouteSpec("GET", "/readyz", readyz),
        RouteSpec("GET", "/metrics", metrics),
    ]
    if cfg.listen.debug_endpoints:
        routes.append(RouteSpec("GET", "/debug/bindings", debug_bindings))
    return routes


def api_routes() -> list[RouteSpec]:
    """The proxied API (http/endpoints.py) and the model list; a key is needed on each."""
    routes = [RouteSpec(e.method, e.path, handler(e), True, True, e.errors) for e in ENDPOINTS]
    routes.append(RouteSpec("GET", "/v1/models", models, authenticated=True))
    return routes


def build_app(
    cfg: NodeConfig,
    metrics_registry: CollectorRegistry | None = None,
    resolver: Resolver = system_resolver,
) -> web.Application:
    """The node's API application; with `listen.ops_port` unset it serves the probes and
    /metrics too (else `build_ops_app` does, on that port). `resolver` resolves DNS-named
    backends."""
    metrics_registry = metrics_registry or CollectorRegistry()
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_headers": 64},
    )
    app[NODE] = app
    app[CONFIG] = cfg
    app[STATUS] = NodeStatus()
    app[METRICS_REGISTRY] = metrics_registry
    http_metrics = app[HTTP_METRICS] = HttpMetrics(metrics_registry, __version__)
    api = api_routes()
    ops = _ops_routes(cfg) if cfg.listen.ops_port is None else []
    http_metrics.init_routes(
        sorted({r.path for r in api} | OPS_ROUTES), sorted(r.path for r in api if r.tracked)
    )
    app[AFFINITY_METRICS] = AffinityMetrics(metrics_registry)
    app[ACCESS_LOG] = _access_log(cfg)
    http_metrics.show_config(config_hash(cfg))
    tracing = app[TRACING] = make_tracing(
        cfg.tracing.otlp_endpoint,
        cfg.tracing.sample_ratio,
        cfg.tracing.flush_interval_seconds,
        cfg.node_id,
    )
    app.on_cleanup.append(lambda _app: tracing.close())
    app.cleanup_ctx.append(partial(node_resources, resolver=resolver))
    app.on_shutdown.append(_start_draining)
    add_routes(app, [*api, *ops])
    return app


def _access_log(cfg: NodeConfig) -> AccessLog:
    """Built even while `logging.access` is off (then `enabled` is False and the wrapper
    gathers nothing), so a config reload can switch it on."""
    if cfg.logging.key_ref == "name":
        refs = KeyRefs.by_name()
    else:
        refs = KeyRefs(cfg.logging.key_ref_secret)
    return AccessLog(cfg.node_id, refs, cfg.listen.trusted_proxies, enabled=cfg.logging.access)


def build_ops_app(node: web.Application) -> web.Application:
    """/healthz, /readyz, /metrics (and /debug/bindings when enabled) of `node`, for the
    operations port: the API port then answers them 404, so a load balancer in front of it
    never exposes them."""
    ops = web.Application()
    ops[NODE] = node
    ops[CONFIG] = node[CONFIG]
    ops[STATUS] = node[STATUS]
    ops[HTTP_METRICS] = node[HTTP_METRICS]
    ops[ACCESS_LOG] = NullAccessLog()  # the access log is the API's
    ops[TRACING] = NullTracing()  # and so are the spans
    add_routes(ops, _ops_routes(node[CONFIG]))
    return ops


# -- running it ------------------------------------------------------------------------------


@dataclass
class RunningNode:
    app: web.Application
    runner: web.AppRunner
    port: int
    ops_port: int | None = None
    """The operations port when `listen.ops_port` is set."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """Where /healthz, /readyz and /metrics answer."""
        return f"http://127.0.0.1:{self.ops_port}" if self.ops_port is not None else self.url

    @property
    def engine(self) -> AffinityEngine:
        return self.app[ENGINE]

    @property
    def backends(self) -> BackendPool:
        return self.app[BACKENDS]

    @property
    def metrics_registry(self) -> CollectorRegistry:
        return self.app[METRICS_REGISTRY]

    @property
    def keys(self) -> KeyCache:
        return self.app[KEYS]

    async def drain(self, timeout: float) -> bool:
        """Stop taking work; wait for requests in progress. True when all finished."""
        status = self.app[STATUS]
        status.draining = True
        if status.active == 0:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await status.idle.wait()
        return status.active == 0


@asynccontextmanager
async def run_node(
    cfg: NodeConfig, resolver: Resolver = system_resolver
) -> AsyncIterator[RunningNode]:
    """The API site once the node's resources started; then the operations site, if any,
    which stops last (probes answer until the very end)."""
    app = build_app(cfg, resolver=resolver)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        # Bounds an idle keep-alive connection and one that sends its headers too slowly.
        keepalive_timeout=cfg.limits.client_idle_timeout_seconds,
        shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
    )
    await runner.setup()
    ops_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, cfg.listen.host, cfg.listen.port, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        ops_port = None
        if cfg.listen.ops_port is not None:
            ops_runner = web.AppRunner(
                build_ops_app(app), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_SECONDS
            )
            await ops_runner.setup()
            ops_site = web.TCPSite(
                ops_runner, cfg.listen.host, cfg.listen.ops_port, reuse_address=True
            )
            await ops_site.start()
            ops_port = ops_runner.addresses[0][1]
        yield RunningNode(app, runner, port, ops_port)
    finally:
        await runner.cleanup()
        if ops_runner is not None:
            await ops_runner.cleanup()


GC_THRESHOLDS = (20_000, 20, 20)
"""The collector's thresholds once the node serves (Python's defaults: 700, 10, 10)."""


def settle_collector() -> None:
    """Once the node serves: what start-up built (modules, config, the caches of keys and
    bindings) lives as long as the process, so it leaves the cyclic collector's sight
    (`gc.freeze`), and the youngest generation is collected every 20,000 allocations, not 700.
    A request allocates a few hundred objects and reference counting frees nearly all of
    them; at the defaults the collector ran every few requests and took ~6% of a node's
    throughput on small requests (bench-versus, profile-overhead), and each full collection
    walked every cached key and binding."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(cfg: NodeConfig, config_path: str | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new work, finish streams, flush. SIGHUP
    reloads `config_path`'s safe subset (app/reload.py)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the node runs, a SIGHUP (whose default action ends the process) is only noted.
    loop.add_signal_handler(signal.SIGHUP, log.warning, "SIGHUP while starting: ignored")
    async with run_node(cfg) as node:
        loop.add_signal_handler(signal.SIGHUP, reload_config, node.app, config_path)
        log.info("node %s listening on %s:%d", cfg.node_id, cfg.listen.host, node.port)
        settle_collector()
        if node.ops_port is not None:
            log.info("probes and metrics on %s:%d", cfg.listen.host, node.ops_port)
        await stop.wait()
        log.info("draining (up to %.0fs)", cfg.limits.drain_timeout_seconds)
        finished = await node.drain(cfg.limits.drain_timeout_seconds)
        if not finished:
            log.warning("drain timeout: %d request(s) still open", node.app[STATUS].active)
    log.info("stopped")
