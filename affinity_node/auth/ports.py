"""The auth layer's port: what the key cache needs from the adapters (store/keys.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID


@dataclass(frozen=True, slots=True)
class KeyPage:
    """Usable keys in id order, packed as the database sent them: `digests` 32 bytes a key
    (SHA-256), `ids` 16 (the UUID, big-endian), so a page is two byte strings, not an object
    per key."""

    digests: bytes
    ids: bytes

    @property
    def rows(self) -> int:
        return len(self.ids) // 16

    @property
    def last(self) -> UUID | None:
        """The page's greatest id: the next page starts after it."""
        return UUID(bytes=self.ids[-16:]) if self.ids else None


class KeyStore(Protocol):
    """What the key cache needs from the database (store/keys.py implements it)."""

    async def lookup(self, digest: bytes) -> tuple[UUID, bool] | None:
        """hash -> (key id, revoked), or None when no such key."""

    async def load(self, key_id: UUID) -> tuple[bytes, bool] | None:
        """key id -> (hash, revoked), or None when no such key."""

    async def load_many(self, key_ids: Sequence[UUID]) -> dict[UUID, tuple[bytes, bool]]:
        """key id -> (hash, revoked) for those of `key_ids` that exist (one statement)."""

    async def active_page(self, after: UUID, limit: int) -> KeyPage:
        """At most `limit` usable keys with ids above `after`, in id order (one statement)."""


LimitRow = tuple[UUID, str, int | None, int | None, int | None, int | None]
"""(key id, model or '' for every model, rpm, tpm, max_concurrent, priority class): one
api_key_limits row."""

DemandRow = tuple[UUID, str, str, float, float]
"""(key id, model, node id, requests/s, tokens/s): another node's demand on a scope."""


class LimitStore(Protocol):
    """What the limiter needs from the database (store/limits.py implements it)."""

    async def all_limits(self) -> list[LimitRow]:
        """Every active key's limit rows."""

    async def limits_of(self, key_ids: Sequence[UUID]) -> list[LimitRow]:
        """The limit rows of `key_ids` (none for a revoked or deleted key)."""

    async def exchange(
        self, node_id: str, mine: Sequence[tuple[UUID, str, float, float]], fresh_s: float
    ) -> list[DemandRow]:
        """Write this node's demand per scope, read the other nodes' rows on the same scopes
        updated within `fresh_s` (one statement)."""

    async def expire(self) -> None:
        """Delete rows nobody has written for a while."""

    async def leave(self, node_id: str) -> None:
        """Delete this node's rows (it stops)."""
