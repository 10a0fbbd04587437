"""The node's resources: one aiohttp cleanup context (`node_resources`) that starts each in
dependency order, hands it to the ones that need it, publishes what the handlers read
(http/state.py) and stops them in reverse. It wires; what runs lives with its concern."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial

import asyncpg
from aiohttp import web
from prometheus_client import CollectorRegistry

from affinity_node.app.builders import affinity_engine, database_pool, engine_spec, usage_ledger
from affinity_node.auth.keycache import KeyCache
from affinity_node.auth.limits import EXCHANGE_EVERY_S, Limiter
from affinity_node.auth.limits import FRESH_S as LIMITS_FRESH_S
from affinity_node.config import DatabaseConfig, LimitsConfig, NodeConfig
from affinity_node.http.state import (
    ACCESS_LOG,
    AFFINITY_METRICS,
    API,
    BACKENDS,
    CONFIG,
    ENGINE,
    FAIRQ,
    HEALTH,
    HTTP_METRICS,
    KEYS,
    LEDGER,
    LIMITER,
    METRICS_REGISTRY,
    ROUTER,
    STATUS,
    TRACING,
    UPSTREAM,
    ApiState,
    Relay,
)
from affinity_node.ledger.ledger import Ledger, NullLedger
from affinity_node.observability.collector import NodeCollector, OperatorCollector
from affinity_node.observability.logs import AccessLog
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.routing.backends import Backend, BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.fairq import DEMAND_KEY, SERVICE_SCOPE, FairQueue, FairRules
from affinity_node.routing.fanout import FanoutController, FanoutRules
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.lifecycle import Mover, MoverRules
from affinity_node.routing.load_view import LoadRules, LoadView
from affinity_node.routing.router import AffinityRules, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.fleet_duties import (
    MOVE_EVERY_S,
    REPORT_EVERY_S,
    HealthReporter,
    MoverTurns,
)
from affinity_node.store.keys import PostgresKeyStore, key_names
from affinity_node.store.limits import PostgresLimitStore
from affinity_node.store.notifyqueue import NotifyQueueMonitor
from affinity_node.store.registry import PostgresRegistry, RegistryFollower
from affinity_node.store.schema import SchemaWatch
from affinity_node.tasks import every, stopping
from affinity_node.upstream.client import UpstreamClient, UpstreamTimeouts
from affinity_node.upstream.discovery import DnsDiscovery, DnsEntry, Resolver
from affinity_node.upstream.load_poll import LoadPoller
from affinity_node.upstream.probes import HealthChecker


@dataclass(frozen=True)
class _BackendParts:
    backends: BackendPool
    health: BackendHealth
    discovery: DnsDiscovery


async def node_resources(app: web.Application, resolver: Resolver) -> AsyncIterator[None]:
    """The node's one cleanup context: each resource started in dependency order, handed to
    the ones that need it, published for the handlers (http/state.py), and stopped in reverse.
    The ledger stops after every request has finished, so its last flush holds them all."""
    cfg = app[CONFIG]
    metrics = app[AFFINITY_METRICS]
    async with AsyncExitStack() as stack:
        enter = stack.enter_async_context
        db = await enter(database_pool(cfg.database, cfg.node_id))
        await enter(_schema(app, db))
        ledger = app[LEDGER] = await enter(_ledger(cfg, db, app[METRICS_REGISTRY], metrics))
        keys = app[KEYS] = await enter(_keys(cfg.database, db, metrics))
        await enter(_key_names(app, db))
        app[LIMITER] = await enter(_limiter(cfg, db, keys, metrics))
        client = app[UPSTREAM] = await enter(_upstream(cfg.limits))
        cache = BindingCache(cfg.affinity.cache_max_entries, on_evict=metrics.evicted)
        parts = await enter(_backends(cfg, app[HTTP_METRICS], client, resolver, cache))
        backends = app[BACKENDS] = parts.backends
        app[HEALTH] = parts.health
        backend_registry = PostgresRegistry(db)
        follower = RegistryFollower(backend_registry, backends, cfg.allow)
        stack.push_async_callback(follower.stop)  # after the engine: its listener nudges it
        stacked = await enter(
            affinity_engine(engine_spec(cfg), db, metrics, keys, follower=follower, cache=cache)
        )
        engine = app[ENGINE] = stacked.engine
        router = app[ROUTER] = await enter(_router(app, db, parts, engine, client))
        relay = Relay(
            backends,
            router,
            client,
            app[HTTP_METRICS],
            cfg.limits,
            ledger,
            app[ACCESS_LOG],
            app[TRACING],
        )
        app[API] = ApiState(relay, app[STATUS], cfg.node_id, app[LIMITER], app[FAIRQ])
        await enter(_fleet(app, db, backend_registry, follower, parts, engine))
        yield


KEY_NAMES_EVERY_S = 10.0


@asynccontextmanager
async def _key_names(app: web.Application, db: asyncpg.Pool) -> AsyncIterator[None]:
    """Keys' names for the access log, re-read periodically, when `logging.key_ref: name`."""
    access = app[ACCESS_LOG]
    if not isinstance(access, AccessLog) or not access.key_ref.wants_names:
        yield
        return
    refs = access.key_ref

    async def load() -> None:
        refs.set_names(await key_names(db))

    async with stopping(every(KEY_NAMES_EVERY_S, load, "key-names", now=True)):
        yield


SCHEMA_CHECK_EVERY_S = 1.0


@asynccontextmanager
async def _schema(app: web.Application, db: asyncpg.Pool) -> AsyncIterator[None]:
    """Readiness waits for the schema this code needs (a node may start before its migration
    Job ran): one look now, then one a second until it is there."""
    status = app[STATUS]
    watch = SchemaWatch(db, timeout_s=app[CONFIG].database.statement_timeout_ms / 1000)

    async def look() -> None:
        try:
            await watch.check()
        finally:
            status.schema_behind = not watch.current

    status.schema_behind = True
    with contextlib.suppress(asyncpg.PostgresError, OSError, asyncio.TimeoutError):
        await look()
    async with stopping(every(SCHEMA_CHECK_EVERY_S, look, "schema-check")):
        yield


@asynccontextmanager
async def _ledger(
    cfg: NodeConfig,
    db: asyncpg.Pool,
    metrics_registry: CollectorRegistry,
    metrics: AffinityMetrics,
) -> AsyncIterator[Ledger]:
    ledger = (
        usage_ledger(cfg, db, metrics_registry, metrics) if cfg.ledger.enabled else NullLedger()
    )
    ledger.start()
    try:
        yield ledger
    finally:
        await ledger.stop()


@asynccontextmanager
async def _keys(
    db_cfg: DatabaseConfig, db: asyncpg.Pool, metrics: AffinityMetrics
) -> AsyncIterator[KeyCache]:
    keys = KeyCache(PostgresKeyStore(db, timeout_s=db_cfg.statement_timeout_ms / 1000), metrics)
    keys.start()
    try:
        yield keys
    finally:
        await keys.stop()


@asynccontextmanager
async def _limiter(
    cfg: NodeConfig, db: asyncpg.Pool, keys: KeyCache, metrics: AffinityMetrics
) -> AsyncIterator[Limiter]:
    """Per-key limits: loaded, then exchanged with the other nodes about once a second; the
    key cache's doorbells name the keys whose limits to re-read."""
    store = PostgresLimitStore(db, timeout_s=cfg.database.statement_timeout_ms / 1000)
    limiter = Limiter(store, cfg.node_id, metrics.count_ratelimited)
    keys.on_change = limiter.key_changed
    try:
        async with stopping(every(EXCHANGE_EVERY_S, limiter.round, "limits-exchange", now=True)):
            yield limiter
    finally:
        keys.on_change = None
        with contextlib.suppress(Exception):
            await limiter.leave()


@asynccontextmanager
async def _upstream(limits: LimitsConfig) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(
        UpstreamTimeouts(
            connect_s=limits.upstream_connect_timeout_seconds,
            read_s=limits.upstream_read_timeout_seconds,
            generation_s=limits.generation_timeout_seconds,
        )
    )
    try:
        yield client
    finally:
        await client.close()


def _backend_left(metrics: HttpMetrics, client: UpstreamClient, backend: Backend) -> None:
    """What the node kept per backend goes with it (DNS churn would grow it without bound)."""
    metrics.forget_backend(backend.id)
    client.forget_backend(backend.id)


@asynccontextmanager
async def _backends(
    cfg: NodeConfig,
    metrics: HttpMetrics,
    client: UpstreamClient,
    resolver: Resolver,
    cache: BindingCache,
) -> AsyncIterator[_BackendParts]:
    """The backend pool with its DNS-named backends resolved and models discovered before the first
    request, and the health checks running. A backend that left DNS leaves the pool once it
    runs nothing and holds no binding (`cache`: empty until the engine fills it)."""
    backends = BackendPool(
        [BackendSpec(b.url, b.kind, tuple(b.models)) for b in cfg.backends if b.url],
        [ModelSpec(x.name, tuple(x.aliases), x.affinity) for x in cfg.models],
        on_remove=partial(_backend_left, metrics, client),
    )
    discovery = DnsDiscovery(
        backends,
        [DnsEntry(b.dns, b.port, b.scheme, b.kind, tuple(b.models)) for b in cfg.backends if b.dns],
        resolver,
        is_idle=lambda b: b.inflight == 0 and cache.bindings_of(b.id) == 0,
        allow=cfg.allow,
    )
    await discovery.resolve_once()
    health = BackendHealth(
        backends,
        eject_after_failures=cfg.health.eject_after_failures,
        readmit_after_successes=cfg.health.readmit_after_successes,
    )
    checker = HealthChecker(backends, health, client, cfg.health.interval_seconds)
    await checker.discover()
    async with stopping(checker.start(), checker.start_discovery(cfg.discovery.interval_seconds)):
        yield _BackendParts(backends, health, discovery)


@asynccontextmanager
async def _router(
    app: web.Application,
    db: asyncpg.Pool,
    parts: _BackendParts,
    engine: AffinityEngine,
    client: UpstreamClient,
) -> AsyncIterator[Router]:
    """The router, with the load signal and the fan-out controller it consults."""
    cfg = app[CONFIG]
    aff = cfg.affinity
    backends = parts.backends
    load = LoadView(
        backends,
        LoadRules(queue_bound=aff.fanout_queue_bound, hot_factor=aff.fanout_hot_factor),
    )
    fanout = FanoutController(
        engine,
        load,
        backends,
        FanoutRules(
            max_fanout=aff.max_fanout,
            grow_after_s=aff.fanout_grow_after_seconds,
            shrink_after_s=aff.fanout_shrink_after_seconds,
        ),
    )
    router = Router(
        backends,
        make_strategy(cfg.routing.fallback),
        engine,
        AffinityRules(aff.enabled, aff.load_factor, aff.spill_min_gap),
        app[AFFINITY_METRICS],
        parts.health,
        fanout,
    )
    fairq = app[FAIRQ] = _fair_queue(app, backends, load)
    fair_store = PostgresLimitStore(db, timeout_s=cfg.database.statement_timeout_ms / 1000)

    async def fair_exchange() -> None:
        """The fair queue's service and demand, with the other nodes (as the limits')."""
        rows = await fair_store.fair_exchange(
            cfg.node_id, fairq.fleet_rows(), LIMITS_FRESH_S, SERVICE_SCOPE, DEMAND_KEY
        )
        fairq.fleet_update(rows)

    def after_poll() -> None:
        fanout.sweep()
        if fairq.rules.enabled:
            fairq.learn()

    poller = LoadPoller(backends, load, client, cfg.load.poll_interval_seconds, after_poll)
    collector = NodeCollector(
        backends,
        engine.cache,
        app[AFFINITY_METRICS],
        app[HTTP_METRICS],
        [x.name for x in cfg.models],
    )
    app[METRICS_REGISTRY].register(collector)
    tasks = [poller.start()]
    if fairq.rules.enabled:
        tasks.append(every(EXCHANGE_EVERY_S, fair_exchange, "fair-exchange", now=True))
    try:
        async with stopping(*tasks):
            yield router
    finally:
        app[METRICS_REGISTRY].unregister(collector)
        await fanout.stop()


def _fair_queue(app: web.Application, backends: BackendPool, load: LoadView) -> FairQueue:
    """Fair queueing under saturation; switched off, it never learns and never holds one."""
    fair = app[CONFIG].fairness
    metrics = app[AFFINITY_METRICS]
    return FairQueue(
        backends,
        load,
        FairRules(
            fair.enabled,
            fair.max_queue,
            fair.max_wait_seconds,
            fair.half_life_seconds,
            fair.reserve_slots,
        ),
        on_depth=metrics.queue_changed,
        on_wait=metrics.queue_waited,
        nodes=lambda: app[LIMITER].alive,
        node_id=app[CONFIG].node_id,
    )


@asynccontextmanager
async def _fleet(
    app: web.Application,
    db: asyncpg.Pool,
    backend_registry: PostgresRegistry,
    follower: RegistryFollower,
    parts: _BackendParts,
    engine: AffinityEngine,
) -> AsyncIterator[None]:
    """The node's part in the fleet: health reports to the registry, the NOTIFY queue's fill,
    DNS re-resolution, and the fleet's mover (drain, rebalance)."""
    cfg = app[CONFIG]
    reporter = HealthReporter(backend_registry, parts.backends, cfg.node_id)
    queue = NotifyQueueMonitor(db)
    tasks = [
        every(REPORT_EVERY_S, reporter.report_once, "health-report", now=True),
        queue.start(),
    ]
    if parts.discovery.active:
        tasks.append(parts.discovery.start(cfg.discovery.interval_seconds))
    if cfg.affinity.enabled and cfg.affinity.store == "postgres":
        mover = Mover(engine, parts.backends, backend_registry, _mover_rules(cfg))
        turns = MoverTurns(mover)
        tasks.append(every(MOVE_EVERY_S, turns.tick, "mover", now=True))
    operator = OperatorCollector(lambda: queue.usage, lambda: len(follower.refused))
    app[METRICS_REGISTRY].register(operator)
    try:
        async with stopping(*tasks):
            yield
    finally:
        app[METRICS_REGISTRY].unregister(operator)


def _mover_rules(cfg: NodeConfig) -> MoverRules:
    return MoverRules(
        drain_moves_per_s=cfg.drain.moves_per_second,
        rebalance=cfg.rebalance.enabled,
        rebalance_moves_per_minute=cfg.rebalance.max_moves_per_minute,
        rebalance_skew=cfg.rebalance.skew,
        rebalance_after_s=cfg.rebalance.after_seconds,
    )
