"""The affinity engine against a real Postgres, several nodes sharing one database."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.store.lockkeys import CLEANUP_LOCK, binding_lock_key
from affinity_node.store.queries import QUERIES
from tests.support.nodes import BACKENDS, CountingChooser, QueryCounter, new_key, nodes
from tests.support.waiting import wait_for

MODEL = "llama-3.1-8b"


def metric(node, name: str, **labels: str) -> float:
    value = node.metrics_registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_concurrent_cold_misses_on_three_nodes_make_one_binding(dsn, db):
    key = await new_key(db)
    chooser = CountingChooser()
    async with nodes(dsn, 3) as fleet:
        calls = [
            node.engine.resolve(key, MODEL, BACKENDS, chooser) for _ in range(100) for node in fleet
        ]
        results = await asyncio.gather(*calls)

        assert len({r.backend for r in results}) == 1
        assert chooser.calls == 1
        outcomes = [r.outcome for r in results]
        assert outcomes.count("created") == 1
        assert set(outcomes) <= {"created", "found_after_lock", "found_in_db", "hit"}
        rows = await db.fetch("SELECT provider_url FROM api_key_model_affinity")
        assert [r["provider_url"] for r in rows] == [results[0].backend]
        created = sum(
            metric(n, "affinity_cache_misses_total", model=MODEL, outcome="created") for n in fleet
        )
        assert created == 1
        # Each node made at most one trip to the database for the burst (single flight).
        for node in fleet:
            trips = sum(
                metric(node, "affinity_cache_misses_total", model=MODEL, outcome=o)
                for o in ("created", "found_in_db", "found_after_lock")
            )
            assert trips == 100  # every caller is counted, one per resolve
            assert metric(node, "affinity_lock_wait_seconds_count") <= 1


async def test_hit_touches_no_database_and_takes_no_lock(dsn, db):
    key = await new_key(db)
    counter = QueryCounter()
    chooser = CountingChooser()
    async with nodes(dsn, 1, on_query=counter) as (node,):
        first = await node.engine.resolve(key, MODEL, BACKENDS, chooser)
        assert first.outcome == "created"
        await wait_for(lambda: len(node.engine.cache) == 1, what="binding cached")
        # The creation's own notification rings this node's doorbell (one read of the table,
        # in the background, not caused by any hit): let it be answered before counting.
        await wait_for(
            lambda: node.engine.watermark >= first.version and not node.engine.doorbells_pending,
            what="the node's own notification answered",
        )
        # Another session holds this pair's advisory lock: a hit must not care.
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", binding_lock_key(key, MODEL))
            # Armed around the hits only: while the lock was taken, the node's background work
            # (the coherence check's snapshot query) could run, and was counted as a hit's.
            counter.armed = True
            results = [
                await node.engine.resolve(key, MODEL, BACKENDS, chooser) for _ in range(1000)
            ]
            counter.armed = False
        assert {r.outcome for r in results} == {"hit"}
        assert {r.backend for r in results} == {first.backend}
        assert counter.queries == []
        assert metric(node, "affinity_cache_hits_total", model=MODEL) == 1000
        assert chooser.calls == 1
        # The logger is live: a miss while armed is counted (so zero above means zero).
        counter.armed = True
        other = await new_key(db, "other")
        await node.engine.resolve(other, MODEL, BACKENDS, chooser)
        assert counter.queries, "query logger saw nothing: the zero above proves nothing"


async def test_rebind_reaches_other_nodes_and_stale_notifications_are_ignored(dsn, db):
    key = await new_key(db)
    chooser = CountingChooser()
    async with nodes(dsn, 3) as (a, b, c):
        first = await a.engine.resolve(key, MODEL, BACKENDS, chooser)
        pair = (key, MODEL)
        for n in (b, c):
            await wait_for(lambda n=n: n.engine.cache.get(pair) is not None, what="insert seen")
        old_version = b.engine.cache.get(pair).version

        healthy = [x for x in BACKENDS if x != first.backend]
        moved = await a.engine.resolve(key, MODEL, healthy, chooser)
        assert moved.outcome == "rebind" and moved.backend != first.backend

        def follows(n) -> bool:
            e = n.engine.cache.get(pair)
            return e is not None and e.backend == moved.backend

        for n in (b, c):
            await wait_for(lambda n=n: follows(n), timeout=2, what="rebind seen by peers")
        new_version = b.engine.cache.get(pair).version
        assert new_version > old_version
        row = await db.fetchrow("SELECT provider_url, version FROM api_key_model_affinity")
        assert (row["provider_url"], row["version"]) == (moved.backend, new_version)
        assert metric(a, "affinity_rebinds_total", model=MODEL, reason="unhealthy") == 1

        # A late notification carrying the old binding (lower version) must not undo it.
        stale = json.dumps(
            {
                "op": "update",
                "api_key_id": str(key),
                "model": MODEL,
                "provider_url": first.backend,
                "version": old_version,
                "ttl": 100.0,
                "sent_at": time.time(),
                "expires_at": None,
            }
        )
        await db.execute("SELECT pg_notify('affinity_changes', $1)", stale)
        # A marker sent afterwards proves the stale one was delivered and processed first.
        other = await new_key(db, "marker")
        await a.engine.resolve(other, MODEL, BACKENDS, chooser)
        for n in (b, c):
            await wait_for(
                lambda n=n: n.engine.cache.get((other, MODEL)) is not None, what="marker seen"
            )
            assert follows(n)
            assert metric(n, "affinity_notifications_total", op="update") >= 2
        # On every node, the next resolve is a hit on the new backend.
        for n in (a, b, c):
            r = await n.engine.resolve(key, MODEL, healthy, chooser)
            assert (r.backend, r.outcome) == (moved.backend, "hit")


async def test_malformed_notification_is_dropped_and_listener_survives(dsn, db):
    key = await new_key(db)
    async with nodes(dsn, 2) as (a, b):
        for junk in ("not json", "{}", '{"op": "explode"}', json.dumps({"op": "insert"})):
            await db.execute("SELECT pg_notify('affinity_changes', $1)", junk)
        r = await a.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
        await wait_for(lambda: b.engine.cache.get((key, MODEL)) is not None, what="insert seen")
        assert b.engine.cache.get((key, MODEL)).backend == r.backend
        assert b.listener.up


async def test_listener_killed_reconnects_and_resyncs_changes_made_while_down(dsn, db):
    key = await new_key(db)
    chooser = CountingChooser()
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes([dsn, proxy.dsn]) as (a, b):
            first = await a.engine.resolve(key, MODEL, BACKENDS, chooser)
            pair = (key, MODEL)
            await wait_for(lambda: b.engine.cache.get(pair) is not None, what="b has binding")

            # Keep b's listener from coming back while the change happens.
            await proxy.refuse_new()
            pids = await db.fetch(
                "SELECT pid FROM pg_stat_activity "
                "WHERE application_name = 'affinity-node-listener:n1'"
            )
            assert len(pids) == 1, "listener backend not found"
            assert await db.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])
            await wait_for(lambda: metric(b, "affinity_listener_up") == 0, what="listener down")

            healthy = [x for x in BACKENDS if x != first.backend]
            moved = await a.engine.resolve(key, MODEL, healthy, chooser)
            assert moved.outcome == "rebind"
            deleted_key = await new_key(db, "gone")
            await a.engine.resolve(deleted_key, MODEL, BACKENDS, chooser)
            await db.execute("DELETE FROM api_keys WHERE id = $1", deleted_key)
            assert b.engine.cache.get(pair).backend == first.backend  # b missed it: still stale

            await proxy.start()
            await wait_for(lambda: metric(b, "affinity_listener_up") == 1, what="listener back")
            assert b.engine.cache.get(pair).backend == moved.backend
            assert b.engine.cache.get((deleted_key, MODEL)) is None
            assert metric(b, "affinity_listener_reconnects_total") >= 1
            assert metric(b, "affinity_cache_resyncs_total") >= 2
            r = await b.engine.resolve(key, MODEL, healthy, chooser)
            assert (r.backend, r.outcome) == (moved.backend, "hit")
    finally:
        await proxy.close()


async def test_database_outage_degrades_and_recovers(dsn, db):
    known, fresh = await new_key(db, "known"), await new_key(db, "fresh")
    chooser = CountingChooser()
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(proxy.dsn) as (node,):
            bound = await node.engine.resolve(known, MODEL, BACKENDS, chooser)
            assert bound.outcome == "created"
            assert metric(node, "affinity_db_up") == 1

            await proxy.stop()
            calls_before = chooser.calls
            hits = [await node.engine.resolve(known, MODEL, BACKENDS, chooser) for _ in range(50)]
            assert {(r.backend, r.outcome) for r in hits} == {(bound.backend, "hit")}
            degraded = [
                await node.engine.resolve(fresh, MODEL, BACKENDS, chooser) for _ in range(20)
            ]
            assert {r.outcome for r in degraded} == {"degraded"}
            # Degraded requests of one pair stay on one backend of this node meanwhile.
            assert len({r.backend for r in degraded}) == 1
            assert chooser.calls > calls_before
            assert metric(node, "affinity_db_up") == 0
            degraded_count = metric(
                node, "affinity_cache_misses_total", model=MODEL, outcome="degraded"
            )
            assert degraded_count == 20
            await wait_for(lambda: metric(node, "affinity_listener_up") == 0, what="listener down")
            # Refreshes and failovers during the outage fail quietly too.
            node.engine.failed_over(known, MODEL, bound.backend, BACKENDS[2])
            await node.engine.flush_refreshes()

            await proxy.start()
            await wait_for(
                lambda: metric(node, "affinity_listener_up") == 1,
                timeout=15,
                what="listener back after outage",
            )
            r = await node.engine.resolve(fresh, MODEL, BACKENDS, chooser)
            assert r.outcome == "created"
            assert metric(node, "affinity_db_up") == 1
            assert await db.fetchval("SELECT count(*) FROM api_key_model_affinity") == 2
    finally:
        await proxy.close()


async def test_frozen_database_is_detected_by_the_probe(dsn, db):
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(proxy.dsn) as (node,):
            assert metric(node, "affinity_listener_up") == 1
            proxy.freeze()  # sockets stay open, nothing flows: asyncpg alone would never notice
            await wait_for(
                lambda: metric(node, "affinity_listener_up") == 0,
                timeout=10,
                what="probe notices a hung listener connection",
            )
            key = await new_key(db)
            r = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            assert r.outcome == "degraded"
            await proxy.stop()
            await proxy.start()
            await wait_for(
                lambda: metric(node, "affinity_listener_up") == 1, timeout=15, what="listener back"
            )
    finally:
        await proxy.close()


async def test_refreshed_entry_is_reread_and_expired_entry_is_recreated(dsn, db):
    key = await new_key(db)
    chooser = CountingChooser()
    pair = (key, MODEL)
    async with nodes(dsn, 2, ttl_seconds=1.5) as (a, b):
        first = await a.engine.resolve(key, MODEL, BACKENDS, chooser)
        await wait_for(lambda: b.engine.cache.get(pair) is not None, what="b has binding")
        version = b.engine.cache.get(pair).version

        # Node a serves past half the TTL and refreshes (a pure extension: b is not told).
        entry = a.engine.cache.get(pair)
        await wait_for(lambda: entry.deadline - time.monotonic() < 0.75, what="half-spent")
        a.engine.served(key, MODEL, first.backend)
        assert await a.engine.flush_refreshes() == 1
        assert metric(a, "affinity_refresh_writes_total") == 1
        assert metric(b, "affinity_notifications_total", op="update") == 0

        # b's local deadline passes; the row is alive thanks to a: b re-reads, does not create.
        b_entry = b.engine.cache.get(pair)
        await wait_for(lambda: b_entry.deadline < time.monotonic(), what="b's entry expires")
        r = await b.engine.resolve(key, MODEL, BACKENDS, chooser)
        assert (r.backend, r.outcome) == (first.backend, "found_in_db")
        assert b.engine.cache.get(pair).version == version
        assert chooser.calls == 1

        # Nobody refreshes now: once the row has expired in the database it is re-created.
        await wait_for(
            lambda: db.fetchval("SELECT expires_at < now() FROM api_key_model_affinity"),
            timeout=5,
            what="row expires",
        )
        r = await b.engine.resolve(key, MODEL, BACKENDS, chooser)
        assert r.outcome == "created"
        assert chooser.calls == 2
        row = await db.fetchrow("SELECT version, provider_url FROM api_key_model_affinity")
        assert row["provider_url"] == r.backend
        assert await db.fetchval("SELECT count(*) FROM api_key_model_affinity") == 1


async def test_refresh_is_one_statement_for_many_pairs_and_skips_moved_bindings(dsn, db):
    keys = [await new_key(db, f"k{i}") for i in range(20)]
    chooser = CountingChooser()
    counter = QueryCounter()
    async with nodes(dsn, 1, on_query=counter, ttl_seconds=1000) as (node,):
        for k in keys:
            await node.engine.resolve(k, MODEL, BACKENDS, chooser)
        await db.execute("UPDATE api_key_model_affinity SET expires_at = now() + interval '1s'")
        moved_key = keys[0]
        await db.execute(
            "UPDATE api_key_model_affinity SET provider_url = 'http://elsewhere:1' "
            "WHERE api_key_id = $1",
            moved_key,
        )
        await wait_for(
            lambda: node.engine.cache.get((moved_key, MODEL)).backend == "http://elsewhere:1",
            what="move seen",
        )
        # Nodes only learn a shorter TTL on their next read; emulate by re-reading (expire).
        for k in keys:
            e = node.engine.cache.get((k, MODEL))
            node.engine.cache.extend((k, MODEL), e.backend, e.version, 1.0, time.monotonic())
        for k in keys:
            node.engine.served(k, MODEL, node.engine.cache.get((k, MODEL)).backend)
        node.engine.served(moved_key, MODEL, BACKENDS[0])  # stale backend: ignored
        counter.armed = True
        extended = await node.engine.flush_refreshes()
        counter.armed = False
        assert extended == 20
        assert counter.ours() == [QUERIES["binding_refresh"]]
        live = await db.fetchval(
            "SELECT count(*) FROM api_key_model_affinity WHERE expires_at > now() + interval '900s'"
        )
        assert live == 20


async def test_cleanup_deletes_only_expired_rows_one_leader_at_a_time(dsn, db):
    keys = [await new_key(db, f"k{i}") for i in range(5)]
    chooser = CountingChooser()
    async with nodes(dsn, 2, cleanup_batch=2) as (a, b):
        for k in keys:
            await a.engine.resolve(k, MODEL, BACKENDS, chooser)
        await db.execute(
            "UPDATE api_key_model_affinity SET expires_at = now() - interval '1 second' "
            "WHERE api_key_id = ANY($1::uuid[])",
            keys[:3],
        )
        async with db.transaction():  # another node is cleaning: we step aside
            await db.execute("SELECT pg_advisory_xact_lock($1)", CLEANUP_LOCK)
            assert await b.engine.cleanup_expired() == 0
        assert await b.engine.cleanup_expired() == 3
        left = await db.fetch("SELECT api_key_id FROM api_key_model_affinity")
        assert {r["api_key_id"] for r in left} == set(keys[3:])
        # Deleting rows that had already expired wakes no node.
        assert metric(a, "affinity_notifications_total", op="delete") == 0


async def test_deleting_a_key_removes_its_bindings_everywhere(dsn, db):
    doomed, kept = await new_key(db, "doomed"), await new_key(db, "kept")
    chooser = CountingChooser()
    models = ["m1", "m2", "m3"]
    async with nodes(dsn, 3) as fleet:
        for m in models:
            await fleet[0].engine.resolve(doomed, m, BACKENDS, chooser)
        await fleet[0].engine.resolve(kept, "m1", BACKENDS, chooser)
        for n in fleet:
            await wait_for(lambda n=n: len(n.engine.cache) == 4, what="all cached")
        await db.execute("DELETE FROM api_keys WHERE id = $1", doomed)
        assert (
            await db.fetchval(
                "SELECT count(*) FROM api_key_model_affinity WHERE api_key_id = $1", doomed
            )
            == 0
        )
        for n in fleet:
            await wait_for(lambda n=n: len(n.engine.cache) == 1, timeout=10, what="evicted")
            assert n.engine.cache.get((kept, "m1")) is not None


async def test_concurrent_refresh_flushes_on_many_nodes_never_deadlock(dsn, db):
    keys = [await new_key(db, f"k{i}") for i in range(200)]
    chooser = CountingChooser()
    async with nodes(dsn, 3, ttl_seconds=1000) as fleet:
        for k in keys:
            await fleet[0].engine.resolve(k, MODEL, BACKENDS, chooser)
        for n in fleet:
            await wait_for(lambda n=n: len(n.engine.cache) == 200, what="all cached")
        for _round in range(5):
            for i, n in enumerate(fleet):
                order = keys if i % 2 == 0 else list(reversed(keys))  # opposite lock orders
                for k in order:
                    e = n.engine.cache.get((k, MODEL))
                    n.engine.cache.extend((k, MODEL), e.backend, e.version, 1.0, time.monotonic())
                    n.engine.served(k, MODEL, e.backend)
            await asyncio.gather(*(n.engine.flush_refreshes() for n in fleet))
        errors = sum(metric(n, "affinity_db_errors_total", operation="refresh") for n in fleet)
        assert errors == 0
        assert sum(metric(n, "affinity_refresh_writes_total") for n in fleet) == 15


async def test_binding_writes_skip_the_wal_flush_wait_and_only_they_do(dsn, db):
    """Under the pair's lock the commit does not wait for its WAL flush (a notifying commit
    holds NOTIFY's one lock across it); the setting ends with the transaction, so other writes
    on a pooled connection (ledger, keys) still commit durably."""
    before = await db.fetchval("SHOW synchronous_commit")
    assert before != "off"
    async with db.transaction():
        await db.execute(QUERIES["binding_lock"], binding_lock_key(uuid.uuid4(), "m"))
        assert await db.fetchval("SHOW synchronous_commit") == "off"
    assert await db.fetchval("SHOW synchronous_commit") == before
