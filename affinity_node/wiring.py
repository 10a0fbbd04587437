"""The one place that builds the concrete engine: pool, store, cache, listener, metrics."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine import AffinityEngine, EngineSettings
from affinity_node.routing.ports import BindingStore
from affinity_node.store.events import parse_binding_event
from affinity_node.store.listener import ChangeListener, ListenerSettings
from affinity_node.store.memory import MemoryBindingStore
from affinity_node.store.postgres import (
    PoolSettings,
    PostgresBindingStore,
    QueryLogger,
    create_pool,
)

log = logging.getLogger(__name__)

BINDINGS_CHANNEL = "affinity_changes"
KEYS_CHANNEL = "api_key_changes"


@dataclass
class EngineConfig:
    dsn: str
    node_id: str = "node"
    pool_max: int = 10
    statement_timeout_ms: int = 2000
    cache_max_entries: int = 100_000
    startup_sync_timeout_s: float = 5.0
    probe_interval_s: float = 2.0
    engine: EngineSettings = field(default_factory=EngineSettings)


@dataclass
class RunningEngine:
    engine: AffinityEngine
    store: PostgresBindingStore
    listener: ChangeListener
    pool: asyncpg.Pool
    metrics: AffinityMetrics
    registry: CollectorRegistry


@asynccontextmanager
async def running_engine(
    config: EngineConfig,
    registry: CollectorRegistry | None = None,
    extra_channels: Mapping[str, Callable[[str], None]] | None = None,
    on_query: QueryLogger | None = None,
    start_background: bool = True,
    metrics: AffinityMetrics | None = None,
    extra_resync: Sequence[Callable[[], Awaitable[None]]] = (),
    on_pool: Callable[[asyncpg.Pool], None] | None = None,
    store_kind: Literal["postgres", "memory"] = "postgres",
) -> AsyncIterator[RunningEngine]:
    """Start a node's engine: LISTEN, snapshot, then serve (degraded if Postgres is down).

    With `store_kind="memory"` the bindings stay in this node (as routers without shared
    state keep them); the pool and listener still serve the API keys.
    """
    registry = registry or CollectorRegistry()
    metrics = metrics or AffinityMetrics(registry)
    pool = await create_pool(
        PoolSettings(
            dsn=config.dsn,
            pool_max=config.pool_max,
            statement_timeout_ms=config.statement_timeout_ms,
            application_name=f"affinity-node:{config.node_id}",
        ),
        on_query=on_query,
    )
    if on_pool is not None:
        on_pool(pool)
    pg_store = PostgresBindingStore(pool, acquire_timeout_s=config.statement_timeout_ms / 1000)
    store: BindingStore = pg_store if store_kind == "postgres" else MemoryBindingStore()
    cache = BindingCache(max_entries=config.cache_max_entries)
    listener: ChangeListener | None = None

    def offset() -> float:
        return listener.clock_offset if listener is not None else 0.0

    engine = AffinityEngine(store, cache, metrics, config.engine, db_clock_offset=offset)
    channels: dict[str, Callable[[str], None]] = dict(extra_channels or {})
    if store_kind == "postgres":
        channels[BINDINGS_CHANNEL] = lambda p: engine.apply_event(parse_binding_event(p))

    async def on_synced() -> None:
        for hook in extra_resync:
            await hook()
        await engine.resync()

    listener = ChangeListener(
        ListenerSettings(
            dsn=config.dsn,
            probe_interval_s=config.probe_interval_s,
            application_name=f"affinity-node-listener:{config.node_id}",
        ),
        channels,
        on_synced=on_synced,
        on_state=engine.listener_state,
        on_reconnect=metrics.listener_reconnects.inc,
        on_query=on_query,
    )
    listener.start()
    try:
        if not await listener.wait_synced(config.startup_sync_timeout_s):
            log.warning("serving before the first snapshot: Postgres did not answer in time")
        if start_background:
            engine.start_background()
        yield RunningEngine(engine, pg_store, listener, pool, metrics, registry)
    finally:
        await engine.stop()
        await listener.stop()
        await pool.close()
