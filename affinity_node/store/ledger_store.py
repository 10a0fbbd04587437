"""The usage ledger on Postgres: batched upsert-adds, the retention cleanup, and the report the
`usage` command prints (statements in queries.sql)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

import asyncpg

from affinity_node.ledger.ports import COUNT_COLUMNS, LedgerRow, LedgerUnavailable
from affinity_node.store.lockkeys import LEDGER_CLEANUP_LOCK
from affinity_node.store.postgres import DB_ERRORS, is_outage
from affinity_node.store.queries import QUERIES as Q


def _unavailable(exc: BaseException) -> LedgerUnavailable:
    """A refusal the database gave (not an outage, not a busy lock or deadlock, which a
    retry settles) is `rejected`."""
    busy = isinstance(exc, asyncpg.LockNotAvailableError | asyncpg.DeadlockDetectedError)
    return LedgerUnavailable(exc, rejected=not is_outage(exc) and not busy)


class PostgresLedgerStore:
    """Implements ledger.LedgerStore on the database pool."""

    def __init__(self, db: asyncpg.Pool, acquire_timeout_s: float = 2.0) -> None:
        self._db = db
        self._acquire_timeout = acquire_timeout_s

    async def add(
        self, writer: uuid.UUID, node_id: str, seq: int, rows: Sequence[LedgerRow]
    ) -> bool:
        ordered = sorted(rows)  # the ledger sorts already; the lock order must not depend on it
        columns: list[list[object]] = [[] for _ in range(4 + len(COUNT_COLUMNS))]
        for (key_id, model, backend, hour), counts in ordered:
            for column, value in zip(columns, (key_id, model, backend, hour, *counts), strict=True):
                column.append(value)
        try:
            async with self._db.acquire(timeout=self._acquire_timeout) as conn:
                row = await conn.fetchrow(Q["ledger_add"], writer, node_id, seq, *columns)
        except DB_ERRORS as exc:
            raise _unavailable(exc) from exc
        assert row is not None
        claimed: bool = row["claimed"]
        return claimed

    async def delete_expired(self, older_than_s: float, batch: int) -> int | None:
        try:
            async with (
                self._db.acquire(timeout=self._acquire_timeout) as conn,
                conn.transaction(),
            ):
                if not await conn.fetchval(Q["binding_cleanup_lock"], LEDGER_CLEANUP_LOCK):
                    return None
                status = await conn.execute(Q["ledger_cleanup_batch"], older_than_s, batch)
                await conn.execute(Q["ledger_writers_cleanup"])
        except DB_ERRORS as exc:
            raise _unavailable(exc) from exc
        return int(status.split()[-1])


async def usage_report(
    conn: asyncpg.Connection | asyncpg.Pool,
    since: timedelta,
    api_key_id: uuid.UUID | None = None,
    key_name: str | None = None,
    model: str | None = None,
) -> list[asyncpg.Record]:
    """Per (key, model) over the hours that overlap `since` (most lost cache first)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        Q["usage_report"], since.total_seconds(), api_key_id, key_name, model
    )
    return rows
