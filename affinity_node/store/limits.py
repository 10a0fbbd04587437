"""Per-key limits in Postgres: the limit rows (api_key_limits, set by `keys create|update`)
and the nodes' demand exchange (affinity_limit_demand), for auth/limits.py."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from affinity_node.auth.limits import Limits
from affinity_node.auth.ports import DemandRow, LimitRow
from affinity_node.store.queries import QUERIES as Q


class PostgresLimitStore:
    """auth.ports.LimitStore on the node's pool, every wait bounded (a slow database fails a
    round of the exchange, never a request)."""

    def __init__(self, pool: asyncpg.Pool, timeout_s: float = 2.0) -> None:
        self._pool = pool
        self._timeout = timeout_s

    async def all_limits(self) -> list[LimitRow]:
        return await self._rows("key_limits_all")

    async def limits_of(self, key_ids: Sequence[uuid.UUID]) -> list[LimitRow]:
        return await self._rows("key_limits_of", list(key_ids))

    async def _rows(self, name: str, *args: object) -> list[LimitRow]:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(Q[name], *args, timeout=self._timeout)
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def exchange(
        self, node_id: str, mine: Sequence[tuple[uuid.UUID, str, float, float]], fresh_s: float
    ) -> list[DemandRow]:
        return await self._upsert_read("limit_exchange", node_id, mine, fresh_s)

    async def fair_exchange(
        self,
        node_id: str,
        mine: Sequence[tuple[uuid.UUID, str, float, float]],
        fresh_s: float,
        service_scope: str,
        demand_key: uuid.UUID,
    ) -> list[DemandRow]:
        """The fair queue's rows: write this node's, read every other node's fresh ones."""
        return await self._upsert_read(
            "fair_exchange", node_id, mine, fresh_s, service_scope, demand_key
        )

    async def _upsert_read(
        self,
        name: str,
        node_id: str,
        mine: Sequence[tuple[uuid.UUID, str, float, float]],
        *args: object,
    ) -> list[DemandRow]:
        ordered = sorted(mine)  # the same row order on every node: no lock-order surprises
        async with self._pool.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(
                Q[name],
                node_id,
                [m[0] for m in ordered],
                [m[1] for m in ordered],
                [m[2] for m in ordered],
                [m[3] for m in ordered],
                *args,
                timeout=self._timeout,
            )
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def expire(self) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(Q["limit_demand_expire"], timeout=self._timeout)

    async def leave(self, node_id: str) -> None:
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.execute(Q["limit_demand_leave"], node_id, timeout=self._timeout)


async def set_limits(
    conn: asyncpg.Connection,
    key_id: uuid.UUID,
    model: str,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    priority: int | None = None,
) -> Limits:
    """Change the given limits of a key (None: keep; 0: remove that limit, or class 0); the
    trigger rings every node. Returns the limits now in force on that scope."""
    async with conn.transaction():
        row = await conn.fetchrow(Q["key_limits_get"], key_id, model)
        old = Limits() if row is None else Limits(row[0], row[1], row[2], row[3])
        new = Limits(
            _merge(old.rpm, rpm),
            _merge(old.tpm, tpm),
            _merge(old.max_concurrent, max_concurrent),
            _merge(old.priority, priority),
        )
        if new == Limits():
            await conn.execute(Q["key_limits_clear"], key_id, model)
        else:
            await conn.execute(
                Q["key_limits_put"],
                key_id,
                model,
                new.rpm,
                new.tpm,
                new.max_concurrent,
                new.priority,
            )
    return new


def _merge(old: int | None, given: int | None) -> int | None:
    if given is None:
        return old
    return None if given == 0 else given


async def list_limits(conn: asyncpg.Connection) -> dict[uuid.UUID, dict[str, Limits]]:
    out: dict[uuid.UUID, dict[str, Limits]] = {}
    for r in await conn.fetch(Q["key_limits_list"]):
        out.setdefault(r[0], {})[r[1]] = Limits(r[2], r[3], r[4], r[5])
    return out
