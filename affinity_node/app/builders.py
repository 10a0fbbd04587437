"""The builders the node, the CLI and the tests share: the database pool, the binding store,
the affinity engine with its listener, the usage ledger."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial

import asyncpg
from prometheus_client import CollectorRegistry

from affinity_node.auth.keycache import KeyCache
from affinity_node.config import DatabaseConfig, NodeConfig
from affinity_node.ledger.ledger import LedgerSettings, UsageLedger
from affinity_node.observability.metrics import AffinityMetrics, LedgerMetrics
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.ports import BindingStore
from affinity_node.store.events import (
    BINDINGS_CHANNEL,
    KEYS_CHANNEL,
    parse_binding_event,
    parse_key_event,
)
from affinity_node.store.ledger_store import PostgresLedgerStore
from affinity_node.store.listener import ChangeListener, DbClockOffset, Handler, ListenerSettings
from affinity_node.store.memory import MemoryBindingStore
from affinity_node.store.postgres import (
    PoolSettings,
    PostgresBindingStore,
    QueryLogger,
    close_pool,
    create_pool,
)
from affinity_node.store.registry import REGISTRY_CHANNEL, RegistryFollower
from affinity_node.vocabulary import StoreKind

log = logging.getLogger(__name__)


@asynccontextmanager
async def database_pool(
    db_cfg: DatabaseConfig, node_id: str, on_query: QueryLogger | None = None
) -> AsyncIterator[asyncpg.Pool]:
    """A lazy pool (no connection until first use), so a node starts while Postgres is down."""
    db = await create_pool(
        PoolSettings(
            dsn=db_cfg.dsn_source,
            pool_max=db_cfg.pool_max,
            statement_timeout_ms=db_cfg.statement_timeout_ms,
            lock_timeout_ms=db_cfg.lock_timeout_ms,
            application_name=f"affinity-node:{node_id}",
            statement_cache=db_cfg.statement_cache,
        ),
        on_query=on_query,
    )
    try:
        yield db
    finally:
        await close_pool(db)


def postgres_bindings(db: asyncpg.Pool) -> PostgresBindingStore:
    return PostgresBindingStore(db)


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
        listener=ListenerSettings(dsn=cfg.database.listener_dsn),
    )


@dataclass(frozen=True)
class EngineStack:
    engine: AffinityEngine
    store: BindingStore
    listener: ChangeListener


@asynccontextmanager
async def affinity_engine(
    spec: EngineSpec,
    db: asyncpg.Pool,
    metrics: AffinityMetrics,
    keys: KeyCache | None = None,
    *,
    follower: RegistryFollower | None = None,
    on_query: QueryLogger | None = None,
    background: bool = True,
    cache: BindingCache | None = None,
) -> AsyncIterator[EngineStack]:
    """The engine with its store and its listener: LISTEN, keys, then the bindings (a catch-up,
    or a paged snapshot that goes on in the background while the node serves); degraded while
    Postgres does not answer.

    With `spec.store == "memory"` no Postgres binding store is built: the bindings stay in this
    node (as routers without shared state keep them); the listener still serves the keys.
    `cache`: one made earlier (the node's DNS discovery asks it which backends hold bindings).
    """
    store: BindingStore = (
        postgres_bindings(db) if spec.store == "postgres" else MemoryBindingStore()
    )
    if cache is None:
        cache = BindingCache(spec.cache_max_entries, on_evict=metrics.evicted)
    clock = DbClockOffset()  # the listener measures it, the engine dates notifications with it
    engine = AffinityEngine(store, cache, metrics, spec.engine, db_clock_offset=clock)
    handlers: dict[str, Handler] = {}
    if spec.store == "postgres":
        handlers[BINDINGS_CHANNEL] = lambda p: engine.doorbell(parse_binding_event(p))
    if keys is not None:
        handlers[KEYS_CHANNEL] = partial(_key_event, keys)
    if follower is not None:
        handlers[REGISTRY_CHANNEL] = follower.nudge

    async def on_synced() -> None:
        if keys is not None:
            await keys.resync()
        if follower is not None:  # before the bindings: it says which backends exist
            await follower.reload()
        await engine.resync()

    def on_state(up: bool) -> None:
        if keys is not None:
            keys.listener_state(up)
        engine.listener_state(up)

    listener = ChangeListener(
        replace(
            spec.listener,
            dsn=spec.db.listener_dsn,
            application_name=f"affinity-node-listener:{spec.node_id}",
        ),
        handlers,
        on_synced=on_synced,
        on_state=on_state,
        on_reconnect=metrics.listener_reconnects.inc,
        on_failure=lambda kind: metrics.listener_failures.labels(kind).inc(),
        on_query=on_query,
        on_watermark=engine.advance_watermark if spec.store == "postgres" else None,
        clock=clock,
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


def usage_ledger(
    cfg: NodeConfig,
    db: asyncpg.Pool,
    metrics_registry: CollectorRegistry,
    metrics: AffinityMetrics,
) -> UsageLedger:
    """The ledger on the node's database pool, its metrics on `metrics_registry` (not
    started yet)."""
    led = cfg.ledger
    return UsageLedger(
        PostgresLedgerStore(db),
        LedgerMetrics(metrics_registry, metrics.db_errors),
        cfg.node_id,
        LedgerSettings(
            flush_interval_s=led.flush_interval_seconds,
            retention_s=led.retention_days * 86400,
            max_rows=led.max_pending_rows,
        ),
    )
