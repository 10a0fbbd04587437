"""The demo's per-tenant section: what the nodes' usage ledger says about one run's tenants
(read after the nodes stopped, so each has flushed its last counts)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import asyncpg

from affinity_node.sim.report import LedgerTenant, ledger_tenants
from affinity_node.store.ledger_store import usage_report


async def read_ledger_tenants(
    dsn: str, key_ids: Sequence[uuid.UUID], top: int = 5
) -> list[LedgerTenant]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await usage_report(conn, timedelta(days=1))
    finally:
        await conn.close()
    return ledger_tenants(rows, key_ids, top)
