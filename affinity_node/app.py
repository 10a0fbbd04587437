"""The composition root: the one place that builds a node from its config.

Each resource is an aiohttp cleanup context, started in dependency order and stopped in
reverse: database pool -> usage ledger -> key cache -> upstream client -> backend pool and
health checker -> affinity engine (binding store, listener, engine; it checks notifications
against the backend pool) -> router. The ledger stops after every request has finished, so
its last flush holds them all. Each publishes what it built under one typed key
(http/state.py), so handlers read ready, non-optional state. Only this module and the CLI
import the adapters (store/); the CLI and the tests build their pieces with the same builders
(`database_pool`, `affinity_engine`, `postgres_bindings`, `usage_ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from affinity_node import __version__
from affinity_node.auth.keycache import KeyCache
from affinity_node.config import DatabaseConfig, NodeConfig
from affinity_node.http.api import handler
from affinity_node.http.endpoints import ENDPOINTS
from affinity_node.http.ops import debug_bindings, healthz, metrics, models, readyz
from affinity_node.http.state import (
    ACCESS_LOG,
    AFFINITY_METRICS,
    BACKENDS,
    CONFIG,
    ENGINE,
    HEALTH,
    HTTP_METRICS,
    KEYS,
    LEDGER,
    NODE,
    REGISTRY,
    ROUTER,
    STATUS,
    TRANSPORT,
    UPSTREAM,
    NodeStatus,
)
from affinity_node.http.wrapper import OPS_ROUTES, RouteSpec, add_routes
from affinity_node.ledger.ledger import LedgerSettings, UsageLedger
from affinity_node.observability.collector import NodeCollector, OperatorCollector
from affinity_node.observability.logs import AccessLog, RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics, LedgerMetrics
from affinity_node.routing.backends import Backend, BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.fanout import FanoutController, FanoutRules
from affinity_node.routing.health import BackendHealth
from affinity_node.routing.lifecycle import Mover, MoverRules
from affinity_node.routing.load import LoadRules, LoadView
from affinity_node.routing.ports import BindingStore
from affinity_node.routing.router import AffinityRules, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.events import (
    BINDINGS_CHANNEL,
    KEYS_CHANNEL,
    parse_binding_event,
    parse_key_event,
)
from affinity_node.store.keys import PostgresKeyStore
from affinity_node.store.ledger import PostgresLedgerStore
from affinity_node.store.listener import ChangeListener, Handler, ListenerSettings
from affinity_node.store.memory import MemoryBindingStore
from affinity_node.store.notifyqueue import NotifyQueueMonitor
from affinity_node.store.postgres import (
    DB_ERRORS,
    PoolSettings,
    PostgresBindingStore,
    QueryLogger,
    create_pool,
)
from affinity_node.store.registry import REGISTRY_CHANNEL, PostgresRegistry, RegistryFollower
from affinity_node.upstream.client import UpstreamClient, UpstreamTimeouts
from affinity_node.upstream.discovery import DnsDiscovery, DnsEntry, Resolver, system_resolver
from affinity_node.upstream.health import HealthChecker
from affinity_node.upstream.load import LoadPoller
from affinity_node.vocabulary import StoreKind

log = logging.getLogger(__name__)

DB_POOL = web.AppKey("db_pool", asyncpg.Pool)
DISCOVERY = web.AppKey("discovery", DnsDiscovery)
FOLLOWER = web.AppKey("registry_follower", RegistryFollower)
RESOLVER: web.AppKey[Resolver] = web.AppKey("resolver")
"""How DNS-named backends are resolved (`build_app(resolver=...)`: tests inject one)."""

SHUTDOWN_GRACE_SECONDS = 2.0
"""After the drain (`serve`), what aiohttp still grants open handlers before cancelling them:
the drain already waited `limits.drain_timeout_seconds`, so the exit is not delayed further
(aiohttp's own default is 60 s, which would outlast the platform's grace period)."""


# -- builders (shared with the CLI and the tests) ----------------------------------------------


@asynccontextmanager
async def database_pool(
    db: DatabaseConfig, node_id: str, on_query: QueryLogger | None = None
) -> AsyncIterator[asyncpg.Pool]:
    """A lazy pool (no connection until first use), so a node starts while Postgres is down."""
    pool = await create_pool(
        PoolSettings(
            dsn=db.dsn,
            pool_max=db.pool_max,
            statement_timeout_ms=db.statement_timeout_ms,
            lock_timeout_ms=db.lock_timeout_ms,
            application_name=f"affinity-node:{node_id}",
        ),
        on_query=on_query,
    )
    try:
        yield pool
    finally:
        await pool.close()


def postgres_bindings(pool: asyncpg.Pool) -> PostgresBindingStore:
    return PostgresBindingStore(pool)


@dataclass(frozen=True)
class EngineSpec:
    """Everything the affinity engine's stack needs, derived from the config by `engine_spec`
    (tests adjust timings with `dataclasses.replace`)."""

    db: DatabaseConfig
    node_id: str
    store: StoreKind = "postgres"
    cache_max_entries: int = 0
    engine: EngineSettings = field(default_factory=EngineSettings)
    listener: ListenerSettings = field(default_factory=lambda: ListenerSettings(dsn=""))


def engine_spec(cfg: NodeConfig) -> EngineSpec:
    return EngineSpec(
        db=cfg.database,
        node_id=cfg.node_id,
        store=cfg.affinity.store,
        cache_max_entries=cfg.affinity.cache_max_entries,
        engine=replace(
            EngineSettings(),
            ttl_seconds=cfg.affinity.ttl_seconds,
            refresh_flush_interval_s=cfg.affinity.refresh_flush_interval_seconds,
        ),
        listener=ListenerSettings(dsn=cfg.database.dsn),
    )


@dataclass(frozen=True)
class EngineStack:
    engine: AffinityEngine
    store: BindingStore
    listener: ChangeListener


@asynccontextmanager
async def affinity_engine(
    spec: EngineSpec,
    pool: asyncpg.Pool,
    metrics: AffinityMetrics,
    keys: KeyCache | None = None,
    *,
    registry: RegistryFollower | None = None,
    on_query: QueryLogger | None = None,
    background: bool = True,
) -> AsyncIterator[EngineStack]:
    """The engine with its store and its listener: LISTEN, keys, then the bindings (a catch-up,
    or a paged snapshot that goes on in the background while the node serves); degraded while
    Postgres does not answer.

    With `spec.store == "memory"` no Postgres binding store is built: the bindings stay in this
    node (as routers without shared state keep them); the listener still serves the keys.
    """
    store: BindingStore = (
        postgres_bindings(pool) if spec.store == "postgres" else MemoryBindingStore()
    )
    cache = BindingCache(max_entries=spec.cache_max_entries)
    listener: ChangeListener | None = None

    def db_clock_offset() -> float:
        return listener.clock_offset if listener is not None else 0.0

    engine = AffinityEngine(
        store,
        cache,
        metrics,
        spec.engine,
        db_clock_offset=db_clock_offset,
    )
    handlers: dict[str, Handler] = {}
    if spec.store == "postgres":
        handlers[BINDINGS_CHANNEL] = lambda p: engine.doorbell(parse_binding_event(p))
    if keys is not None:
        handlers[KEYS_CHANNEL] = partial(_key_event, keys)
    if registry is not None:
        handlers[REGISTRY_CHANNEL] = registry.nudge

    async def on_synced() -> None:
        if keys is not None:
            await keys.resync()
        if registry is not None:  # before the bindings: it says which backends exist
            await registry.reload()
        await engine.resync()

    def on_state(up: bool) -> None:
        if keys is not None:
            keys.listener_state(up)
        engine.listener_state(up)

    listener = ChangeListener(
        replace(
            spec.listener,
            dsn=spec.db.dsn,
            application_name=f"affinity-node-listener:{spec.node_id}",
        ),
        handlers,
        on_synced=on_synced,
        on_state=on_state,
        on_reconnect=metrics.listener_reconnects.inc,
        on_failure=lambda kind: metrics.listener_failures.labels(kind).inc(),
        on_query=on_query,
        on_watermark=engine.advance_watermark if spec.store == "postgres" else None,
    )
    listener.start()
    try:
        if not await listener.wait_synced(spec.db.startup_wait_seconds):
            log.warning("serving before the first sync: Postgres did not answer in time")
        if background:
            engine.start_background()
        yield EngineStack(engine, store, listener)
    finally:
        await engine.stop()
        await listener.stop()


def _key_event(keys: KeyCache, payload: str) -> None:
    event = parse_key_event(payload)
    if event is not None:
        keys.on_event(*event)


# -- the node's resources, in dependency order -------------------------------------------------


async def _database(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    async with database_pool(cfg.database, cfg.node_id) as pool:
        app[DB_POOL] = pool
        yield


def usage_ledger(
    cfg: NodeConfig, pool: asyncpg.Pool, registry: CollectorRegistry, metrics: AffinityMetrics
) -> UsageLedger:
    """The ledger on the node's pool, its metrics on `registry` (not started yet)."""
    led = cfg.ledger
    return UsageLedger(
        PostgresLedgerStore(pool),
        LedgerMetrics(registry, metrics.db_errors),
        cfg.node_id,
        LedgerSettings(
            flush_interval_s=led.flush_interval_seconds,
            retention_s=led.retention_days * 86400,
            max_rows=led.max_pending_rows,
        ),
    )


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    if not cfg.ledger.enabled:
        yield
        return
    ledger = app[LEDGER] = usage_ledger(cfg, app[DB_POOL], app[REGISTRY], app[AFFINITY_METRICS])
    ledger.start()
    yield
    await ledger.stop()


async def _keys(app: web.Application) -> AsyncIterator[None]:
    db = app[CONFIG].database
    keys = app[KEYS] = KeyCache(
        PostgresKeyStore(app[DB_POOL], timeout_s=db.statement_timeout_ms / 1000),
        app[AFFINITY_METRICS],
    )
    task = asyncio.create_task(_poll_keys_while_blind(keys), name="keys-blind-poll")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await keys.stop()


async def _poll_keys_while_blind(keys: KeyCache, interval_s: float = 1.0) -> None:
    warn = RateLimitedLog(log)
    while True:
        await asyncio.sleep(interval_s)
        try:
            await keys.maintain()
        except Exception as exc:  # the database is probably down too: try again next time
            warn.warning("keys-poll", "cannot poll API keys: %r", exc)


async def _engine(app: web.Application) -> AsyncIterator[None]:
    pool = app[BACKENDS]
    follower = app[FOLLOWER] = RegistryFollower(
        PostgresRegistry(app[DB_POOL]), pool, app[CONFIG].allow
    )
    async with affinity_engine(
        engine_spec(app[CONFIG]),
        app[DB_POOL],
        app[AFFINITY_METRICS],
        app[KEYS],
        registry=follower,
    ) as stack:
        app[ENGINE] = stack.engine
        yield
    await follower.stop()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """The fleet's mover (drain, rebalance) and this node's health reports to the registry."""
    cfg = app[CONFIG]
    registry = PostgresRegistry(app[DB_POOL])
    tasks = [asyncio.create_task(_report_health(registry, app[BACKENDS], cfg.node_id))]
    queue = NotifyQueueMonitor(app[DB_POOL])
    tasks.append(asyncio.create_task(queue.run(), name="notify-queue"))
    follower = app[FOLLOWER]
    operator = OperatorCollector(lambda: queue.usage, lambda: len(follower.refused))
    app[REGISTRY].register(operator)
    discovery = app[DISCOVERY]
    if discovery.active:
        cache = app[ENGINE].cache
        discovery.is_idle = lambda b: b.inflight == 0 and cache.bindings_of(b.id) == 0
        tasks.append(asyncio.create_task(discovery.run(cfg.discovery.interval_seconds)))
    if cfg.affinity.enabled and cfg.affinity.store == "postgres":
        mover = Mover(
            app[ENGINE],
            app[BACKENDS],
            registry,
            MoverRules(
                drain_moves_per_s=cfg.drain.moves_per_second,
                rebalance=cfg.rebalance.enabled,
                rebalance_moves_per_minute=cfg.rebalance.max_moves_per_minute,
                rebalance_skew=cfg.rebalance.skew,
                rebalance_after_s=cfg.rebalance.after_seconds,
            ),
        )
        tasks.append(asyncio.create_task(_move(mover), name="mover"))
    yield
    app[REGISTRY].unregister(operator)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _move(mover: Mover) -> None:
    warn = RateLimitedLog(log)
    while True:
        try:
            moved = await mover.tick()
        except DB_ERRORS as exc:
            warn.warning("mover", "binding mover: the database did not answer: %r", exc)
        except Exception:  # the mover must outlive any one bad tick
            log.exception("binding mover failed")
        else:
            if moved is not None:
                log.info("moved a binding (%s)", moved)
        await asyncio.sleep(0.2)


async def _report_health(
    registry: PostgresRegistry, pool: BackendPool, node_id: str, every_s: float = 15.0
) -> None:
    """What this node sees of each backend, for `backends list` (on change, and regularly)."""
    warn = RateLimitedLog(log)
    seen: dict[str, tuple[bool, bool]] = {}  # healthy, busy: a drain ends when none is busy
    last = 0.0
    while True:
        now = time.monotonic()
        due = now - last >= every_s
        for backend in pool.backends:
            state = (backend.healthy, backend.inflight > 0)
            if due or seen.get(backend.id) != state:
                try:
                    await registry.report_health(
                        node_id,
                        backend.id,
                        backend.healthy,
                        backend.kind,
                        backend.models,
                        backend.inflight,
                    )
                    seen[backend.id] = state
                except DB_ERRORS as exc:
                    warn.warning("health-report", "cannot report backend health: %r", exc)
                    break
        if due:
            last = now
            for gone in seen.keys() - {b.id for b in pool.backends}:
                del seen[gone]
        await asyncio.sleep(1.0)


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    limits = app[CONFIG].limits
    client = UpstreamClient(
        UpstreamTimeouts(
            connect_s=limits.upstream_connect_timeout_seconds,
            read_s=limits.upstream_read_timeout_seconds,
            generation_s=limits.generation_timeout_seconds,
        )
    )
    app[UPSTREAM] = client
    app[TRANSPORT] = client
    yield
    await client.close()


def _backend_left(metrics: HttpMetrics, client: UpstreamClient, backend: Backend) -> None:
    """What the node kept per backend goes with it (DNS churn would grow it without bound)."""
    metrics.forget_backend(backend.id)
    client.forget_backend(backend.id)


async def _backends(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    pool = BackendPool(
        [BackendSpec(b.url, b.kind, tuple(b.models)) for b in cfg.backends if b.url],
        [ModelSpec(x.name, tuple(x.aliases), x.affinity) for x in cfg.models],
    )
    pool.on_remove = partial(_backend_left, app[HTTP_METRICS], app[UPSTREAM])
    discovery = app[DISCOVERY] = DnsDiscovery(
        pool,
        [DnsEntry(b.dns, b.port, b.scheme, b.kind, tuple(b.models)) for b in cfg.backends if b.dns],
        app[RESOLVER],
        allow=cfg.allow,
    )
    await discovery.resolve_once()  # DNS-named backends exist before the first request
    health = BackendHealth(
        pool,
        eject_after_failures=cfg.health.eject_after_failures,
        readmit_after_successes=cfg.health.readmit_after_successes,
    )
    app[BACKENDS] = pool
    app[HEALTH] = health
    checker = HealthChecker(pool, health, app[UPSTREAM], cfg.health.interval_seconds)
    await checker.discover()
    tasks = [
        asyncio.create_task(checker.run(), name="health-checks"),
        asyncio.create_task(
            checker.run_discovery(cfg.discovery.interval_seconds), name="model-discovery"
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _router(app: web.Application) -> AsyncIterator[None]:
    """The router, with the load signal and the fan-out controller it consults."""
    cfg = app[CONFIG]
    aff = cfg.affinity
    pool = app[BACKENDS]
    engine = app[ENGINE]
    load = LoadView(
        pool,
        LoadRules(queue_bound=aff.fanout_queue_bound, hot_factor=aff.fanout_hot_factor),
    )
    fanout = FanoutController(
        engine,
        load,
        pool,
        FanoutRules(
            max_fanout=aff.max_fanout,
            grow_after_s=aff.fanout_grow_after_seconds,
            shrink_after_s=aff.fanout_shrink_after_seconds,
        ),
    )
    app[ROUTER] = Router(
        pool,
        make_strategy(cfg.routing.fallback),
        engine,
        AffinityRules(aff.enabled, aff.load_factor, aff.spill_min_gap),
        app[AFFINITY_METRICS],
        app[HEALTH],
        fanout,
    )
    poller = LoadPoller(
        pool, load, app[UPSTREAM], cfg.load.poll_interval_seconds, on_round=fanout.sweep
    )
    task = asyncio.create_task(poller.run(), name="load-poll")
    collector = NodeCollector(
        pool, engine.cache, app[AFFINITY_METRICS], app[HTTP_METRICS], [x.name for x in cfg.models]
    )
    app[REGISTRY].register(collector)
    yield
    app[REGISTRY].unregister(collector)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await fanout.stop()


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
    registry: CollectorRegistry | None = None,
    resolver: Resolver = system_resolver,
) -> web.Application:
    """The node's API application; with `listen.ops_port` unset it serves the probes and
    /metrics too (else `build_ops_app` does, on that port). `resolver` resolves DNS-named
    backends."""
    registry = registry or CollectorRegistry()
    app = web.Application(
        client_max_size=cfg.limits.max_body_bytes,
        handler_args={"max_field_size": 16384, "max_headers": 64},
    )
    app[NODE] = app
    app[RESOLVER] = resolver
    app[CONFIG] = cfg
    app[STATUS] = NodeStatus()
    app[REGISTRY] = registry
    http_metrics = app[HTTP_METRICS] = HttpMetrics(registry, __version__)
    api = api_routes()
    ops = _ops_routes(cfg) if cfg.listen.ops_port is None else []
    http_metrics.init_routes(
        sorted({r.path for r in api} | OPS_ROUTES), sorted(r.path for r in api if r.tracked)
    )
    app[AFFINITY_METRICS] = AffinityMetrics(registry)
    if cfg.logging.access:
        app[ACCESS_LOG] = AccessLog(cfg.node_id)
    app.cleanup_ctx.extend(
        (_database, _ledger, _keys, _upstream, _backends, _engine, _router, _lifecycle)
    )
    app.on_shutdown.append(_start_draining)
    add_routes(app, [*api, *ops])
    return app


def build_ops_app(node: web.Application) -> web.Application:
    """/healthz, /readyz, /metrics (and /debug/bindings when enabled) of `node`, for the
    operations port: the API port then answers them 404, so a load balancer in front of it
    never exposes them."""
    ops = web.Application()
    ops[NODE] = node
    ops[CONFIG] = node[CONFIG]
    ops[STATUS] = node[STATUS]
    ops[HTTP_METRICS] = node[HTTP_METRICS]
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
    def registry(self) -> CollectorRegistry:
        return self.app[REGISTRY]

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


async def serve(cfg: NodeConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain: refuse new work, finish streams, flush."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with run_node(cfg) as node:
        log.info("node %s listening on %s:%d", cfg.node_id, cfg.listen.host, node.port)
        if node.ops_port is not None:
            log.info("probes and metrics on %s:%d", cfg.listen.host, node.ops_port)
        await stop.wait()
        log.info("draining (up to %.0fs)", cfg.limits.drain_timeout_seconds)
        finished = await node.drain(cfg.limits.drain_timeout_seconds)
        if not finished:
            log.warning("drain timeout: %d request(s) still open", node.app[STATUS].active)
    log.info("stopped")
