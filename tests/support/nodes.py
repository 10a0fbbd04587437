"""Several engine "nodes" in one process, each with its own pool, listener and registry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg

from affinity_node.app import EngineSpec
from affinity_node.config import DatabaseConfig
from affinity_node.devtools.support import EngineNode, engine_nodes
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.store.keys import create_key
from affinity_node.store.listener import ListenerSettings
from affinity_node.store.postgres import QueryLogger
from affinity_node.store.queries import QUERIES

BACKENDS = ("http://10.9.0.1:8000", "http://10.9.0.2:8000", "http://10.9.0.3:8000")
"""Backend identities only: these tests never send traffic to them."""


class CountingChooser:
    """A fallback strategy that records each call (round robin over the candidates)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, candidates: Sequence[str]) -> str:
        self.calls += 1
        return candidates[(self.calls - 1) % len(candidates)]


def engine_spec(dsn: str, node_id: str, startup_wait_s: float = 5.0, **engine: Any) -> EngineSpec:
    return EngineSpec(
        db=DatabaseConfig(
            dsn=dsn,
            pool_max=5,
            statement_timeout_ms=1000,
            lock_timeout_ms=500,
            startup_wait_seconds=startup_wait_s,
        ),
        node_id=node_id,
        engine=replace(EngineSettings(), db_retry_after_s=0.2, **engine),
        listener=ListenerSettings(dsn=dsn, probe_interval_s=0.3),
    )


@asynccontextmanager
async def nodes(
    dsn: str | Sequence[str],
    count: int = 1,
    on_query: QueryLogger | None = None,
    background: bool = False,
    startup_wait_s: float = 5.0,
    **engine: Any,
) -> AsyncIterator[list[EngineNode]]:
    """`background` starts the engines' loops (refresh, cleanup, sweep); tests usually drive
    them by hand instead."""
    dsns = [dsn] * count if isinstance(dsn, str) else list(dsn)
    specs = [engine_spec(d, f"n{i}", startup_wait_s, **engine) for i, d in enumerate(dsns)]
    async with engine_nodes(specs, on_query, background=background) as started:
        yield started


async def new_key(dsn_or_conn: str | asyncpg.Connection, name: str = "k") -> uuid.UUID:
    if isinstance(dsn_or_conn, str):
        conn = await asyncpg.connect(dsn_or_conn)
        try:
            key, _ = await create_key(conn, name)
        finally:
            await conn.close()
    else:
        key, _ = await create_key(dsn_or_conn, name)
    return key.id


async def bulk_bindings(
    db: asyncpg.Connection,
    keys: int,
    models: Sequence[str] = ("m0",),
    ttl_s: float = 600.0,
    backends: Sequence[str] = BACKENDS,
) -> list[tuple[uuid.UUID, str]]:
    """`keys` new keys bound to every one of `models`: two statements, through the real
    triggers (versions from the sequence, one notification per row). Returns the pairs."""
    ids = [uuid.uuid4() for _ in range(keys)]
    await db.execute(
        "INSERT INTO api_keys (id, name, key_hash) "
        "SELECT k, 'bulk', sha256(k::text::bytea) FROM unnest($1::uuid[]) AS k",
        ids,
    )
    await db.execute(
        "INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, version, expires_at) "
        "SELECT k, m, ($3::text[])[1 + (abs(hashtext(k::text || m)) % cardinality($3::text[]))], "
        "0, now() + make_interval(secs => $4::float8) "
        "FROM unnest($1::uuid[]) AS k CROSS JOIN unnest($2::text[]) AS m",
        ids,
        list(models),
        list(backends),
        ttl_s,
    )
    return [(k, m) for k in ids for m in models]


async def table_bindings(db: asyncpg.Connection) -> dict[tuple[uuid.UUID, str], tuple[str, int]]:
    """The live bindings: pair -> (backend, version)."""
    rows = await db.fetch(
        "SELECT api_key_id, model, provider_url, version FROM api_key_model_affinity "
        "WHERE expires_at > now()"
    )
    return {(r[0], r[1]): (r[2], r[3]) for r in rows}


def cached_bindings(node: EngineNode) -> dict[tuple[uuid.UUID, str], tuple[str, int]]:
    return {p: (e.backend, e.version) for p, e in node.engine.cache.items()}


class QueryCounter:
    """An asyncpg query logger that records statements while armed (probes excluded)."""

    def __init__(self) -> None:
        self.armed = False
        self.queries: list[str] = []

    def __call__(self, record: Any) -> None:
        if self.armed and record.query != QUERIES["db_clock"]:
            self.queries.append(record.query)

    def ours(self) -> list[str]:
        """Only the product's own statements (not asyncpg's one-time type introspection)."""
        known = set(QUERIES.values())
        return [q for q in self.queries if q in known]
