"""The fair queue's exchange through Postgres: what one node writes (its tenants' recent
service, its demand per model) the others read, fresh rows only, and not the limiter's rows."""

from __future__ import annotations

import uuid

from affinity_node.app import database_pool
from affinity_node.config import DatabaseConfig
from affinity_node.routing.fairq import DEMAND_KEY, SERVICE_SCOPE
from affinity_node.store.limits import PostgresLimitStore


async def test_each_node_reads_the_others_service_and_demand(dsn: str) -> None:
    async with database_pool(DatabaseConfig(dsn=dsn, pool_max=2), "fair") as pool:
        store = PostgresLimitStore(pool)
        flood, small = uuid.uuid4(), uuid.uuid4()
        run = uuid.uuid4().hex[:6]
        a, b = f"fair-a-{run}", f"fair-b-{run}"
        # A limiter's row on the same table is not the fair queue's business.
        await store.exchange(a, [(flood, "", 5.0, 50.0)], 5.0)
        seen_by_a = await store.fair_exchange(
            a,
            [(flood, SERVICE_SCOPE, 0.0, 900.0), (DEMAND_KEY, "m", 40.0, 0.0)],
            5.0,
            SERVICE_SCOPE,
            DEMAND_KEY,
        )
        assert [r for r in seen_by_a if r[2] in (a, b)] == []  # nothing of b yet, not its own
        seen_by_b = await store.fair_exchange(
            b,
            [(small, SERVICE_SCOPE, 0.0, 30.0), (DEMAND_KEY, "m", 3.0, 0.0)],
            5.0,
            SERVICE_SCOPE,
            DEMAND_KEY,
        )
        mine = sorted((r[0], r[1], r[3], r[4]) for r in seen_by_b if r[2] == a)
        assert mine == sorted([(flood, SERVICE_SCOPE, 0.0, 900.0), (DEMAND_KEY, "m", 40.0, 0.0)])
        await store.leave(a)
        await store.leave(b)
        again = await store.fair_exchange(b, [], 5.0, SERVICE_SCOPE, DEMAND_KEY)
        assert [r for r in again if r[2] in (a, b)] == [], "a node that left is gone"
