"""The affinity engine against a real Postgres, several nodes sharing one database."""

from __future__ import annotations

import asyncio
from affinity_node.store.lockkeys import binding_lock_key
from tests.support.nodes import BACKENDS, CountingChooser, QueryCounter, new_key, nodes
from tests.support.waiting import wait_for

MODEL = "llama-3.1-8b"


def metric(node, name: str, **labels: str) -> float:
    value = node.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_concurrent_cold_misses_on_three_nodes_make_one_binding(dsn, db):
    key = await new_key(db)
    chooser = CountingChooser()
    async with nodes(dsn, 3) as fleet:
        calls = [
            node.engine.resolve(key, MODEL, BACKENDS, chooser)
            for _ in range(100)
            for node in fleet
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
        counter.armed = True
        # Another session holds this pair's advisory lock: a hit must not care.
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock($1)", binding_lock_key(key, MODEL))
            results = [await node.engine.resolve(key, MODEL, BACKENDS, chooser) for _ in range(1000)]
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
