"""Resync at scale against a real Postgres: a reconnect reads what changed (the watermark and
the deletion log), a node away too long reloads in pages, and the log is trimmed."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from affinity_node.app import postgres_bindings
from affinity_node.auth.keycache import KeyCache
from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.store.keys import PostgresKeyStore
from affinity_node.store.lockkeys import CLEANUP_LOCK
from affinity_node.store.queries import QUERIES
from tests.support.nodes import (
    BACKENDS,
    CountingChooser,
    EngineNode,
    bulk_bindings,
    cached_bindings,
    new_key,
    nodes,
    table_bindings,
)
from tests.support.waiting import wait_for

KEY_HASH = "SELECT key_hash FROM api_keys WHERE id = $1"


def metric(node: EngineNode, name: str, **labels: str) -> float:
    return node.metrics_registry.get_sample_value(name, labels or None) or 0.0


async def version_now(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT last_value FROM affinity_binding_version_seq"))


async def cut_listener(db: asyncpg.Connection, proxy: FaultProxy, node: EngineNode) -> None:
    """The node's listener loses its connection and cannot come back (its pool keeps its open
    connections) until `proxy.start()`."""
    await proxy.refuse_new()
    pids = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
        "affinity-node-listener:n1",
    )
    assert len(pids) == 1, "listener backend not found"
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
    await wait_for(lambda: metric(node, "affinity_listener_up") == 0, what="listener down")


async def heal(proxy: FaultProxy, node: EngineNode) -> None:
    await proxy.start()
    await wait_for(lambda: metric(node, "affinity_listener_up") == 1, timeout=15, what="back")
    await wait_for(lambda: node.engine.sync_status.state == "done", timeout=15, what="synced")


async def test_a_ten_second_outage_with_1000_changes_resyncs_by_reading_1000_rows(dsn, db):
    pairs = await bulk_bindings(db, keys=1250, models=("m0", "m1", "m2", "m3"))  # 5000
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes([dsn, proxy.dsn]) as (_a, b):
            assert b.engine.sync_status.mode == "full" and len(b.engine.cache) == 5000
            quiet = await version_now(db)
            await wait_for(lambda: b.engine.watermark >= quiet, what="b's watermark")
            await cut_listener(db, proxy, b)
            read_before = b.store.rows_read  # type: ignore[attr-defined]

            # 1000 changes over ten seconds: 600 moves, 200 new bindings, 200 deletions.
            moved, deleted = pairs[:600], pairs[600:800]
            for i in range(10):
                batch = moved[i * 60 : (i + 1) * 60]
                await db.execute(
                    "UPDATE api_key_model_affinity AS a SET provider_url = 'http://moved:1' "
                    "FROM unnest($1::uuid[], $2::text[]) AS m (k, model) "
                    "WHERE a.api_key_id = m.k AND a.model = m.model",
                    [k for k, _ in batch],
                    [m for _, m in batch],
                )
                gone = deleted[i * 20 : (i + 1) * 20]
                await db.execute(
                    "DELETE FROM api_key_model_affinity AS a "
                    "USING unnest($1::uuid[], $2::text[]) AS d (k, model) "
                    "WHERE a.api_key_id = d.k AND a.model = d.model",
                    [k for k, _ in gone],
                    [m for _, m in gone],
                )
                await bulk_bindings(db, keys=20)
                await asyncio.sleep(1.0)  # the outage lasts ten seconds: this is its length
            assert await version_now(db) - quiet == 1000

            await heal(proxy, b)
            status = b.engine.sync_status
            read = b.store.rows_read - read_before  # type: ignore[attr-defined]
            assert (status.mode, read, status.rows_read) == ("incremental", 1000, 1000)
            assert metric(b, "affinity_cache_resync_rows_total", mode="incremental") == 1000
            assert cached_bindings(b) == await table_bindings(db)
            assert len(b.engine.cache) == 5000
    finally:
        await proxy.close()


async def test_a_change_committed_during_the_outage_under_an_older_version_is_caught_up(dsn, db):
    """Versions are taken before commit: a transaction may hold an older version than one
    already notified, and commit while the listener is away. The watermark must not pass it."""
    slow_key, fast_key = await new_key(db, "slow"), await new_key(db, "fast")
    proxy = FaultProxy(dsn)
    await proxy.start()
    slow = await asyncpg.connect(dsn)
    try:
        async with nodes([dsn, proxy.dsn]) as (a, b):
            tx = slow.transaction()
            await tx.start()
            slow_version = await slow.fetchval(
                "INSERT INTO api_key_model_affinity "
                "(api_key_id, model, provider_url, version, expires_at) "
                "VALUES ($1, 'm', $2, 0, now() + interval '10 minutes') RETURNING version",
                slow_key,
                BACKENDS[0],
            )
            fast = await a.engine.resolve(fast_key, "m", BACKENDS, CountingChooser())
            assert fast.version > slow_version
            await wait_for(lambda: b.engine.cache.get((fast_key, "m")) is not None, what="fast")
            probes = b.listener.probes
            await wait_for(lambda: b.listener.probes >= probes + 4, what="four probes")
            assert b.engine.watermark < slow_version  # held back by the open transaction

            await cut_listener(db, proxy, b)
            await tx.commit()  # its notification is lost for b
            await heal(proxy, b)
            assert b.engine.sync_status.mode == "incremental"
            entry = b.engine.cache.get((slow_key, "m"))
            assert entry is not None and entry.version == slow_version
            assert cached_bindings(b) == await table_bindings(db)
    finally:
        await slow.close()
        await proxy.close()


async def test_a_node_away_longer_than_the_deletion_log_reloads_in_pages(dsn, db):
    pairs = await bulk_bindings(db, keys=300, models=("m0", "m1"))
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(
            [dsn, proxy.dsn], deletion_log_retention_s=0.0, snapshot_page_rows=100
        ) as (a, b):
            quiet = await version_now(db)
            await wait_for(lambda: b.engine.watermark >= quiet, what="b's watermark")
            await cut_listener(db, proxy, b)
            doomed = pairs[:50]
            await db.execute(
                "DELETE FROM api_key_model_affinity WHERE api_key_id = ANY($1::uuid[])",
                list({k for k, _ in doomed}),
            )
            await db.execute(
                "UPDATE api_key_model_affinity SET provider_url = 'http://moved:1' "
                "WHERE api_key_id = $1",
                pairs[100][0],
            )
            logged = await db.fetchval("SELECT count(*) FROM affinity_binding_deletions")
            assert logged == 50
            await a.engine.cleanup_expired()  # the leader trims the log: b's gap is too old now
            assert await db.fetchval("SELECT count(*) FROM affinity_binding_deletions") == 0
            horizon = await db.fetchval("SELECT version FROM affinity_binding_deletions_horizon")
            assert horizon > b.engine.watermark
            pages_before = metric(b, "affinity_cache_resync_rows_total", mode="full")

            await heal(proxy, b)
            status = b.engine.sync_status
            assert (status.mode, status.rows_read, status.loaded) == ("full", 550, 550)
            assert metric(b, "affinity_cache_resync_rows_total", mode="full") - pages_before == 550
            assert cached_bindings(b) == await table_bindings(db)
    finally:
        await proxy.close()


async def test_the_deletion_log_is_trimmed_in_batches_by_the_cleaner_only(dsn, db):
    pairs = await bulk_bindings(db, keys=25)
    async with asyncpg.create_pool(dsn, min_size=0, max_size=2) as pool:
        store = postgres_bindings(pool)
        versions = await db.fetch("SELECT version FROM api_key_model_affinity")
        await db.execute("DELETE FROM api_key_model_affinity")  # live rows: logged
        rows = await db.fetch("SELECT version, api_key_id, model FROM affinity_binding_deletions")
        assert {(r[1], r[2]) for r in rows} == set(pairs)
        assert min(r[0] for r in rows) > max(v[0] for v in versions)
        assert await store.trim_deletions(3600.0, 10) == 0  # nothing that old yet
        changes = await store.changes_since(0, 100)
        assert changes is not None and {p for p, _v in changes.deleted} == set(pairs)
        async with db.transaction():  # another node is cleaning: we step aside
            await db.execute("SELECT pg_advisory_xact_lock($1)", CLEANUP_LOCK)
            assert await store.trim_deletions(0.0, 10) is None
        assert [await store.trim_deletions(0.0, 10) for _ in range(4)] == [10, 10, 5, 0]
        horizon = await db.fetchval("SELECT version FROM affinity_binding_deletions_horizon")
        assert horizon == max(r[0] for r in rows)
        assert await store.changes_since(horizon - 1, 100) is None  # too old: reload
        assert await store.changes_since(horizon, 100) is not None


async def test_expired_rows_are_cleaned_without_a_log_entry_or_a_notification(dsn, db):
    await bulk_bindings(db, keys=30)
    async with nodes(dsn, 1, cleanup_batch=7) as (node,):
        await db.execute("UPDATE api_key_model_affinity SET expires_at = now() - interval '1s'")
        assert await node.engine.cleanup_expired() == 30
        assert await db.fetchval("SELECT count(*) FROM api_key_model_affinity") == 0
        assert await db.fetchval("SELECT count(*) FROM affinity_binding_deletions") == 0
        assert metric(node, "affinity_notifications_total", op="delete") == 0


async def test_snapshot_pages_and_catch_ups_are_index_range_scans(dsn, db):
    pairs = await bulk_bindings(db, keys=2000, models=("m0", "m1"))
    await db.execute(
        "DELETE FROM api_key_model_affinity WHERE api_key_id = ANY($1::uuid[])",
        [k for k, _ in pairs[:1000]],
    )
    await db.execute("ANALYZE api_key_model_affinity")
    await db.execute("ANALYZE affinity_binding_deletions")
    await db.execute("ANALYZE api_keys")
    recent = await version_now(db) - 50
    plans = {  # pages small against the table, as 10,000 rows are against a million
        "binding_snapshot_page": (uuid.UUID(int=0), "", 100),
        "binding_changed_since": (recent, 100_001),
        "binding_deleted_since": (recent, 100_001),
        "key_active_page": (uuid.UUID(int=0), 100),
    }
    used = {}
    for name, args in plans.items():
        plan = await db.fetchval(f"EXPLAIN (FORMAT JSON) {QUERIES[name]}", *args)
        used[name] = _scans(json.loads(plan)[0]["Plan"])
    assert used == {
        "binding_snapshot_page": {("Index Scan", "api_key_model_affinity_pkey")},
        "binding_changed_since": {("Index Scan", "api_key_model_affinity_version_idx")},
        "binding_deleted_since": {("Index Scan", "affinity_binding_deletions_pkey")},
        "key_active_page": {("Index Scan", "api_keys_pkey")},
    }


def _scans(plan: dict[str, object]) -> set[tuple[str, str | None]]:
    found = set()
    if "Scan" in str(plan["Node Type"]):
        found.add((str(plan["Node Type"]), plan.get("Index Name")))  # type: ignore[arg-type]
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        found |= _scans(child)
    return found


async def test_the_key_snapshot_is_read_in_pages_and_leaves_revoked_keys_out(dsn, db):
    keys = [await new_key(db, f"k{i}") for i in range(10)]
    await db.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", keys[4])
    expected = {k: bytes(await db.fetchval(KEY_HASH, k)) for k in keys if k != keys[4]}
    async with asyncpg.create_pool(dsn, min_size=0, max_size=1) as pool:
        store = PostgresKeyStore(pool)
        pages, after = [], uuid.UUID(int=0)
        while not pages or pages[-1].rows == 3:
            pages.append(await store.active_page(after, 3))
            after = pages[-1].last or after
        cache = KeyCache(store, page=3)
        await cache.resync()
    assert [p.rows for p in pages] == [3, 3, 3, 0]
    ids = b"".join(p.ids for p in pages)
    digests = b"".join(p.digests for p in pages)
    got = {
        uuid.UUID(bytes=ids[i * 16 : (i + 1) * 16]): digests[i * 32 : (i + 1) * 32]
        for i in range(9)
    }
    assert got == expected  # the packed columns line up, in id order, revoked key left out
    assert len(cache) == 9
    assert all(cache._keys.get(d) == k for k, d in expected.items())
    assert keys[4] not in cache._keys
