"""The auth layer's port: what the key cache needs from the adapters (store/keys.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from uuid import UUID


class KeyStore(Protocol):
    """What the key cache needs from the database (store/keys.py implements it)."""

    async def lookup(self, digest: bytes) -> tuple[UUID, bool] | None:
        """hash -> (key id, revoked), or None when no such key."""

    async def load(self, key_id: UUID) -> tuple[bytes, bool] | None:
        """key id -> (hash, revoked), or None when no such key."""

    async def load_many(self, key_ids: Sequence[UUID]) -> dict[UUID, tuple[bytes, bool]]:
        """key id -> (hash, revoked) for those of `key_ids` that exist (one statement)."""

    async def active(self) -> list[tuple[bytes, UUID]]:
        """Every usable key, by hash."""
