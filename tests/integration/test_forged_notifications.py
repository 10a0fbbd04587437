"""Forged notifications against real nodes: any role that can connect can `pg_notify` on our
channels, and nothing it sends may move a pair, refuse a live key or starve the pool. The
forger here is a role with no privilege on any table (like a read-only dashboard role)."""

from __future__ import annotations

import json
import time
import uuid

import asyncpg

from affinity_node.store.events import BINDINGS_CHANNEL, KEYS_CHANNEL
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]


async def forger(dsn: str) -> asyncpg.Connection:
    """A connection as a role that can read nothing (it can still notify)."""
    conn = await asyncpg.connect(dsn)
    role = f"forger_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE ROLE {role} NOLOGIN")
    await conn.execute(f"SET ROLE {role}")
    return conn


def metric(c: Cluster, node: int, name: str, **labels: str) -> float:
    return c.nodes[node].metrics_registry.get_sample_value(name, labels or None) or 0.0


async def settle(c: Cluster, db: asyncpg.Connection) -> None:
    """Every notification sent so far has been answered on every node: a real change sent
    after them has reached every cache (notifications arrive in commit order)."""
    sentinel, _ = await db.fetchrow(
        "INSERT INTO api_keys (id, name, key_hash) VALUES ($1, 'sentinel', $2) RETURNING id, 1",
        uuid.uuid4(),
        uuid.uuid4().bytes * 2,
    )
    version = await db.fetchval(
        "INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, expires_at)"
        " VALUES ($1, 'sentinel', $2, now() + interval '60 s') RETURNING version",
        sentinel,
        c.backends[0].url,
    )
    for node in c.nodes:
        await wait_for(
            lambda node=node: (
                (e := node.engine.cache.get((sentinel, "sentinel"))) is not None
                and e.version == version
                and not getattr(node.engine, "doorbells_pending", False)
            ),
            what="the sentinel change on every node",
        )


async def test_forged_binding_events_move_nothing_and_a_real_change_still_lands(dsn, db):
    async with cluster(dsn, nodes=2, backends=2) as c:
        secret = await c.new_key("tenant")
        key_id = c.key_ids["tenant"]
        first = await c.client(0, secret).chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES
        )
        bound = first.headers["x-backend-id"]
        row = await db.fetchrow(
            "SELECT provider_url, version, date_part('epoch', expires_at - now()) AS ttl"
            " FROM api_key_model_affinity WHERE api_key_id = $1 AND model = $2",
            key_id,
            MODEL,
        )
        other = next(b.url for b in c.backends if b.url.rstrip("/") != row["provider_url"])
        notify = await forger(dsn)
        try:
            # Plausible: a known backend, a real TTL, the next version, a fresh timestamp.
            for version in (row["version"] + 1, row["version"] + 2):
                forged = {
                    "op": "update", "api_key_id": str(key_id), "model": MODEL,
                    "provider_url": other, "version": version, "ttl": row["ttl"],
                    "sent_at": time.time(), "expires_at": "2100-01-01T00:00:00Z",
                }  # fmt: skip
                await notify.execute(
                    "SELECT pg_notify($1, $2)", BINDINGS_CHANNEL, json.dumps(forged)
                )
            forged_delete = dict(forged, op="delete", version=row["version"] + 3)
            await notify.execute(
                "SELECT pg_notify($1, $2)", BINDINGS_CHANNEL, json.dumps(forged_delete)
            )
        finally:
            await notify.close()
        await settle(c, db)
        for n in range(2):
            entry = c.nodes[n].engine.cache.get((key_id, MODEL))
            assert entry is not None and entry.version == row["version"], f"node {n} moved"
            res = await c.client(n, secret).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES
            )
            assert res.headers["x-backend-id"] == bound
            assert res.headers["x-affinity"] == "hit"
        # A real move (an operator's, here) still reaches every node.
        await db.execute(
            "UPDATE api_key_model_affinity SET provider_url = $3"
            " WHERE api_key_id = $1 AND model = $2",
            key_id,
            MODEL,
            other,
        )
        for n in range(2):
            await wait_for(
                lambda n=n: c.nodes[n].engine.cache.get((key_id, MODEL)).backend == other,
                what="the real move",
            )


async def test_forged_key_events_refuse_no_live_key_and_a_flood_costs_a_few_reads(dsn, db):
    async with cluster(dsn, nodes=2, backends=1) as c:
        secret = await c.new_key("tenant")
        key_id = c.key_ids["tenant"]
        reads_before = [
            sum(metric(c, n, "affinity_key_lookups_total", reason=r) for r in ("created", "verify"))
            for n in range(2)
        ]
        notify = await forger(dsn)
        try:
            revoke = json.dumps({"op": "revoke", "id": str(key_id)})
            await notify.execute("SELECT pg_notify($1, $2)", KEYS_CHANNEL, revoke)
            for n in range(2):  # at once, before any check could have answered
                assert len(c.nodes[n].keys) == 1, "the live key was dropped"
                res = await c.client(n, secret).chat.completions.with_raw_response.create(
                    model=MODEL, messages=MESSAGES
                )
                assert res.status_code == 200
            # A flood of creates for keys that do not exist: 2,000 in one transaction.
            await notify.execute(
                "SELECT pg_notify($1, json_build_object('op', 'create', 'id',"
                " gen_random_uuid())::text) FROM generate_series(1, 2000)",
                KEYS_CHANNEL,
            )
        finally:
            await notify.close()
        for n in range(2):
            await wait_for(
                lambda n=n: not getattr(c.nodes[n].keys, "_pending", None),
                timeout=10,
                what="the checks",
            )
            reads = sum(
                metric(c, n, "affinity_key_lookups_total", reason=r) for r in ("created", "verify")
            )
            assert reads - reads_before[n] <= 10, f"node {n}: {reads - reads_before[n]} reads"
            res = await c.client(n, secret).chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES
            )
            assert res.status_code == 200
