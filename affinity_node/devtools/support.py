"""Harness shared by the benchmarks and the tests, never by the shipped simulator: engine
nodes without an HTTP surface (several in one process) and per-run databases.

It lives in devtools so that it stays out of the wheel; tests/support builds on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    import asyncpg

    from affinity_node.app import EngineSpec
    from affinity_node.routing.engine import AffinityEngine
    from affinity_node.routing.ports import BindingStore
    from affinity_node.store.listener import ChangeListener
    from affinity_node.store.postgres import QueryLogger


def with_database(dsn: str, database: str) -> str:
    """The same server, another database (works for TCP and unix-socket DSNs)."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@dataclass
class EngineNode:
    """One node's affinity engine with its own database pool, listener and metrics registry,
    built by the composition root's builders (tests and benchmarks run several in one
    process)."""

    engine: AffinityEngine
    listener: ChangeListener
    db: asyncpg.Pool
    metrics_registry: CollectorRegistry
    store: BindingStore


async def wait_snapshot(engine: AffinityEngine, timeout_s: float) -> bool:
    """Waits (up to `timeout_s`) until the engine's first bindings snapshot is complete."""
    deadline = time.monotonic() + timeout_s
    while engine.sync_status.state != "done":
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@asynccontextmanager
async def engine_nodes(
    specs: Sequence[EngineSpec],
    on_query: QueryLogger | None = None,
    background: bool = False,
    wait_loaded: bool = True,
) -> AsyncIterator[list[EngineNode]]:
    """`wait_loaded`: each node's bindings snapshot is complete before the next starts (up to
    its `startup_wait_seconds`), as most tests want; a node serves while loading."""
    from affinity_node.app import affinity_engine, database_pool
    from affinity_node.observability.metrics import AffinityMetrics

    async with AsyncExitStack() as stack:
        started = []
        for spec in specs:
            metrics_registry = CollectorRegistry()
            db = await stack.enter_async_context(database_pool(spec.db, spec.node_id, on_query))
            built = await stack.enter_async_context(
                affinity_engine(
                    spec,
                    db,
                    AffinityMetrics(metrics_registry),
                    on_query=on_query,
                    background=background,
                )
            )
            if wait_loaded:
                await wait_snapshot(built.engine, spec.db.startup_wait_seconds)
            started.append(
                EngineNode(built.engine, built.listener, db, metrics_registry, built.store)
            )
        yield started
