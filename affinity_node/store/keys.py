"""API keys: created with a secret shown once; only its SHA-256 is stored."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

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


async def lookup_hash(pool: asyncpg.Pool, digest: bytes) -> tuple[uuid.UUID, bool] | None:
    row = await pool.fetchrow(Q["key_lookup"], digest)
    return None if row is None else (row["id"], row["revoked"])


async def active_hashes(pool: asyncpg.Pool) -> list[tuple[bytes, uuid.UUID]]:
    rows = await pool.fetch(Q["key_active"])
    return [(bytes(r["key_hash"]), r["id"]) for r in rows]
