"""Each way the database fails, reproduced on loopback: a stopped server, a frozen host (a relay
that stops forwarding), a terminated listener session, a lock held by another transaction, a
listener that cannot come back while the pool still works. The node degrades and says so; it
never fails a request it could serve and never waits on a database it knows is gone."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from affinity_node.sim.faultproxy import FaultProxy
from affinity_node.store.listener import ChangeListener, ListenerSettings
from affinity_node.store.lockkeys import binding_lock_key
from tests.support.cluster import MODEL, cluster
from tests.support.nodes import BACKENDS, CountingChooser, new_key, nodes
from tests.support.waiting import wait_for

DETECT_S = 2.5
"""The node must show a lost database within 2 s; the margin is for a loaded CI machine."""


def metric(node, name: str, **labels: str) -> float:
    return node.metrics_registry.get_sample_value(name, labels or None) or 0.0


async def test_a_stopped_database_shows_at_once_even_when_every_request_hits(dsn, db):
    key = await new_key(db)
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(proxy.dsn) as (node,):
            first = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            assert metric(node, "affinity_db_up") == 1
            await proxy.stop()
            await wait_for(
                lambda: metric(node, "affinity_db_up") == 0,
                timeout=DETECT_S,
                what="db_up to fall with only hits",
            )
            for _ in range(20):  # hits keep being served from memory
                hit = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
                assert (hit.backend, hit.outcome) == (first.backend, "hit")
    finally:
        await proxy.close()


async def test_a_frozen_database_shows_within_seconds_and_misses_stop_waiting(dsn, db):
    key = await new_key(db)
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(proxy.dsn) as (node,):
            await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            proxy.freeze()  # nothing flows, nothing resets: only the probe can tell
            await wait_for(
                lambda: metric(node, "affinity_db_up") == 0,
                timeout=DETECT_S,
                what="db_up to fall on a frozen host",
            )
            errors = metric(node, "affinity_db_errors_total", operation="read")
            outcomes = [
                (await node.engine.resolve(key, f"m{i}", BACKENDS, CountingChooser())).outcome
                for i in range(50)
            ]
            assert set(outcomes) == {"degraded"}
            # Not one of them asked the frozen database (each would have timed out).
            assert metric(node, "affinity_db_errors_total", operation="read") == errors
            assert not node.engine.store_available
            await proxy.start()
            await wait_for(
                lambda: metric(node, "affinity_db_up") == 1,
                timeout=15,
                what="recovery after the freeze",
            )
            res = await node.engine.resolve(key, "after", BACKENDS, CountingChooser())
            assert res.outcome == "created"
    finally:
        await proxy.close()


async def test_a_node_started_against_a_frozen_host_serves_and_connects_later(dsn, db):
    key = await new_key(db)
    proxy = FaultProxy(dsn)
    await proxy.start()
    proxy.freeze()  # accepts TCP, then says nothing: connect, LISTEN and snapshot must not hang
    try:
        async with nodes(proxy.dsn, startup_wait_s=0.5) as (node,):
            res = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            assert res.outcome == "degraded"
            await proxy.stop()
            await proxy.start()
            await wait_for(
                lambda: metric(node, "affinity_listener_up") == 1,
                timeout=20,
                what="the listener to connect once the host answers",
            )
            res = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            assert res.outcome in ("created", "found_in_db")
    finally:
        await proxy.close()


async def test_a_lock_held_elsewhere_is_a_lock_timeout_not_an_outage(dsn, db):
    key = await new_key(db)
    async with nodes(dsn) as (node,):
        holder = await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1::bigint)", binding_lock_key(key, MODEL)
            )
            res = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
            assert res.outcome == "degraded"  # this request did not wait past lock_timeout
            await tx.rollback()
        finally:
            await holder.close()
        assert metric(node, "affinity_db_up") == 1 and node.engine.store_available
        assert metric(node, "affinity_lock_wait_seconds_count") == 1
        assert metric(node, "affinity_lock_wait_seconds_bucket", le="0.25") == 0  # it waited
        other = await node.engine.resolve(key, "another-model", BACKENDS, CountingChooser())
        assert other.outcome == "created"  # the next miss goes to the database at once


async def test_a_terminated_listener_session_reconnects_and_db_up_returns(dsn, db):
    async with nodes(dsn) as (node,):
        pid = await db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            "affinity-node-listener:n0",
        )
        assert pid is not None
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        await wait_for(
            lambda: metric(node, "affinity_listener_reconnects_total") == 1,
            timeout=10,
            what="the listener to reconnect",
        )
        await wait_for(lambda: metric(node, "affinity_db_up") == 1, timeout=5, what="db_up")


async def test_while_blind_a_cached_binding_is_reread_after_its_maximum_age(dsn, db):
    """The listener cannot come back (new connections refused) but the pool still works: a
    move made meanwhile reaches this node by re-reading, not by waiting for the TTL."""
    key = await new_key(db)
    proxy = FaultProxy(dsn)
    await proxy.start()
    try:
        async with nodes(
            proxy.dsn,
            background=True,
            blind_grace_s=0.2,
            blind_max_age_s=0.3,
            sweep_interval_s=0.05,
        ) as (node,):
            first = await node.engine.resolve(key, MODEL, BACKENDS, lambda c: BACKENDS[0])
            keep = await node.engine.resolve(key, "warm", BACKENDS, lambda c: BACKENDS[0])
            assert keep.outcome == "created"  # the pool now holds a connection
            await proxy.refuse_new()
            pid = await db.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                "affinity-node-listener:n0",
            )
            await db.execute("SELECT pg_terminate_backend($1)", pid)
            await wait_for(lambda: metric(node, "affinity_listener_up") == 0, what="blind")
            await db.execute(
                "UPDATE api_key_model_affinity SET provider_url = $1 WHERE model = $2",
                BACKENDS[1],
                MODEL,
            )

            async def follows() -> bool:
                res = await node.engine.resolve(key, MODEL, BACKENDS, CountingChooser())
                return res.backend == BACKENDS[1]

            assert first.backend == BACKENDS[0]
            await wait_for(follows, timeout=5, interval=0.05, what="the move to be re-read")
    finally:
        await proxy.close()


async def test_expired_bindings_leave_the_cache_and_the_gauges(dsn, db):
    key = await new_key(db)
    async with nodes(dsn, background=True, ttl_seconds=1.0, sweep_interval_s=0.05) as (node,):
        for i in range(3):
            await node.engine.resolve(key, f"m{i}", BACKENDS, CountingChooser())
        assert metric(node, "affinity_cache_entries") == 3
        await wait_for(
            lambda: metric(node, "affinity_cache_entries") == 0,
            timeout=5,
            what="expired entries to be swept",
        )
        assert node.engine.cache.bindings_per_backend() == {}


async def test_a_random_token_flood_costs_the_database_nothing(dsn):
    async with cluster(dsn, nodes=1, backends=1) as c:
        secret = await c.new_key("alice")
        node = c.nodes[0]
        lookups_before = node.metrics_registry.get_sample_value(
            "affinity_key_lookups_total", {"reason": "unknown"}
        )
        bad = [c.client(0, f"sk-random-{i:04d}-xxxxxxxxxxxxxxxx") for i in range(200)]
        results = await asyncio.gather(*(cl.models.list() for cl in bad), return_exceptions=True)
        odd = [r for r in results if getattr(r, "status_code", None) != 401]
        assert not odd, {repr(r)[:200] for r in odd}
        assert (
            node.metrics_registry.get_sample_value(
                "affinity_key_lookups_total", {"reason": "unknown"}
            )
            == lookups_before
            == 0
        )
        assert (await c.client(0, secret).models.list()).data


async def test_a_listener_hook_that_raises_is_counted_and_the_listener_reconnects(dsn, db):
    """Not a database error: an exception of the node's own (here the watermark hook, once)
    must not end the listener task and leave the node blind."""
    heard: list[str] = []
    states: list[bool] = []
    failures: list[str] = []
    raised = [False]

    def on_watermark(_version: int) -> None:
        if not raised[0]:
            raised[0] = True
            raise RuntimeError("a bug in a hook")

    async def on_synced() -> None:
        return None

    listener = ChangeListener(
        ListenerSettings(dsn=dsn, probe_interval_s=0.05, watermark_interval_s=0.05),
        {"affinity_test_channel": heard.append},
        on_synced=on_synced,
        on_state=states.append,
        on_watermark=on_watermark,
        on_failure=failures.append,
    )
    listener.start()
    try:
        await wait_for(lambda: raised[0], what="the hook to raise")
        await wait_for(lambda: states.count(True) >= 2, timeout=10, what="a reconnect")
        assert failures.count("internal") == 1
        await wait_for(lambda: listener.up, what="synced again")
        await db.execute("SELECT pg_notify('affinity_test_channel', 'after')")
        await wait_for(lambda: heard == ["after"], what="a change after the failure")
    finally:
        await listener.stop()


async def test_a_node_stops_in_bounded_time_while_its_database_is_frozen(dsn):
    """Shutdown must not fail or hang on the database: a graceful pool close waits for every
    connection's goodbye, which a frozen host never sends; past the bound they are cut."""
    proxy = FaultProxy(dsn)
    await proxy.start()
    started = 0.0
    try:
        async with cluster(dsn, nodes=1, backends=1, node_dsn=proxy.dsn) as c:
            secret = await c.new_key("alice")
            assert (await c.client(0, secret).models.list()).data
            node = c.nodes[0]
            await wait_for(
                lambda: node.metrics_registry.get_sample_value("affinity_db_up") == 1,
                what="the database up",
            )
            proxy.freeze()
            started = time.monotonic()
        # Leaving the cluster stopped the node: within the pool's close bound and the drain.
        assert time.monotonic() - started < 30
    finally:
        await proxy.close()
