"""API keys: created with a secret shown once; only its SHA-256 is stored."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from affinity_node.auth.ports import KeyPage
from affinity_node.auth.secrets import hash_secret, new_secret
from affinity_node.store.queries import QUERIES as Q


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: uuid.UUID
    name: str
    created_at: datetime
    revoked_at: datetime | None = None


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> tuple[ApiKey, str]:
    """Returns the key and its secret; the secret is not recoverable afterwards."""
    secret = new_secret()
    row = await conn.fetchrow(Q["key_create"], uuid.uuid4(), name, hash_secret(secret))
    return ApiKey(row["id"], row["name"], row["created_at"]), secret


async def list_keys(conn: asyncpg.Connection | asyncpg.Pool) -> list[ApiKey]:
    rows = await conn.fetch(Q["key_list"])
    return [ApiKey(r["id"], r["name"], r["created_at"], r["revoked_at"]) for r in rows]


async def revoke_key(conn: asyncpg.Connection | asyncpg.Pool, key_id: uuid.UUID) -> bool:
    return await conn.fetchval(Q["key_revoke"], key_id) is not None


async def delete_key(conn: asyncpg.Connection | asyncpg.Pool, key_id: uuid.UUID) -> bool:
    return await conn.fetchval(Q["key_delete"], key_id) is not None


async def key_names(db: asyncpg.Pool, timeout_s: float = 5.0) -> dict[uuid.UUID, str]:
    """Every usable key's public name (the access log's `key_ref: name`)."""
    async with db.acquire(timeout=timeout_s) as conn:
        rows = await conn.fetch(Q["key_names"], timeout=timeout_s)
    return {r["id"]: r["name"] for r in rows}


class PostgresKeyStore:
    """What the node's key cache reads (auth.ports.KeyStore), with bounded waits: a
    saturated pool or a slow database ends the lookup with an error, never a hang."""

    def __init__(
        self, db: asyncpg.Pool, timeout_s: float = 2.0, snapshot_timeout_s: float = 30.0
    ) -> None:
        """`snapshot_timeout_s`: the deadline of one snapshot page (a page of 50,000 keys on a
        busy server can take longer than a request's statement timeout)."""
        self._db = db
        self._timeout = timeout_s
        self._snapshot_timeout = snapshot_timeout_s

    async def lookup(self, digest: bytes) -> tuple[uuid.UUID, bool] | None:
        async with self._db.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(Q["key_lookup"], digest, timeout=self._timeout)
        return None if row is None else (row["id"], row["revoked"])

    async def load(self, key_id: uuid.UUID) -> tuple[bytes, bool] | None:
        async with self._db.acquire(timeout=self._timeout) as conn:
            row = await conn.fetchrow(Q["key_by_id"], key_id, timeout=self._timeout)
        return None if row is None else (bytes(row["key_hash"]), row["revoked"])

    async def load_many(self, key_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[bytes, bool]]:
        """The keys named by notifications, in one statement (a flood costs one per batch)."""
        async with self._db.acquire(timeout=self._timeout) as conn:
            rows = await conn.fetch(Q["key_by_ids"], list(key_ids), timeout=self._timeout)
        return {r["id"]: (bytes(r["key_hash"]), r["revoked"]) for r in rows}

    async def active_page(self, after: uuid.UUID, limit: int) -> KeyPage:
        """One page of the snapshot, packed by the database (two byte strings): a million keys
        load without a row object each. Ids are uuid4: none is the nil UUID the first page
        starts after."""
        timeout_ms = str(int(self._snapshot_timeout * 1000))
        async with self._db.acquire(timeout=self._timeout) as conn, conn.transaction(readonly=True):
            await conn.execute(Q["snapshot_statement_timeout"], timeout_ms)
            row = await conn.fetchrow(
                Q["key_active_page"], after, limit, timeout=self._snapshot_timeout + 1
            )
        assert row is not None  # an aggregate: one row, even for an empty page
        page = KeyPage(bytes(row[0] or b""), bytes(row[1] or b""))
        if len(page.digests) != 2 * len(page.ids):
            raise ValueError("key snapshot page: digests and ids do not line up")
        return page
