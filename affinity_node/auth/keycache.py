"""Which key id a bearer secret belongs to, without a database trip per request.

The node holds every active key's SHA-256 (loaded after LISTEN, like the bindings) and learns
creations, revocations and deletions by NOTIFY on `api_key_changes`. A secret it does not know
is looked up once; unknown hashes are remembered (bounded) so a flood of bad keys does not
become a flood of queries, and forgotten as soon as any key is created.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from uuid import UUID

from affinity_node.auth.secrets import hash_secret

Lookup = Callable[[bytes], Awaitable[tuple[UUID, bool] | None]]
"""hash -> (key id, revoked), or None when no such key."""
Snapshot = Callable[[], Awaitable[list[tuple[bytes, UUID]]]]


class InvalidKey(Exception):
    """Unknown, malformed or revoked key: 401."""


class KeysUnavailable(Exception):
    """The key is not cached and the database cannot say: 503, try again."""


class KeyCache:
    def __init__(
        self,
        lookup: Lookup,
        snapshot: Snapshot,
        max_unknown: int = 10_000,
        unknown_ttl_s: float = 60.0,
    ) -> None:
        self._lookup = lookup
        self._snapshot = snapshot
        self._by_hash: dict[bytes, UUID] = {}
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        self._max_unknown = max_unknown
        self._unknown_ttl = unknown_ttl_s
        self._inflight: dict[bytes, asyncio.Future[tuple[UUID, bool] | None]] = {}
        self.loaded = False
        """True once a snapshot of the active keys has been loaded."""

    def __len__(self) -> int:
        return len(self._by_hash)

    async def authenticate(self, secret: str) -> UUID:
        digest = hash_secret(secret)
        key_id = self._by_hash.get(digest)
        if key_id is not None:
            return key_id
        until = self._unknown.get(digest)
        if until is not None and until > time.monotonic():
            raise InvalidKey
        task = self._inflight.get(digest)
        if task is None:  # one lookup per unknown secret, however many requests carry it
            task = asyncio.ensure_future(self._lookup(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda _t: self._inflight.pop(digest, None))
        try:
            found = await asyncio.shield(task)
        except Exception as exc:
            raise KeysUnavailable from exc
        if found is None or found[1]:
            self._unknown[digest] = time.monotonic() + self._unknown_ttl
            self._unknown.move_to_end(digest)
            if len(self._unknown) > self._max_unknown:
                self._unknown.popitem(last=False)
            raise InvalidKey
        self._by_hash[digest] = found[0]
        return found[0]

    def on_event(self, op: str, key_id: UUID) -> None:
        if op in ("revoke", "delete"):
            for digest in [h for h, i in self._by_hash.items() if i == key_id]:
                del self._by_hash[digest]
        elif op in ("create", "restore"):
            self._unknown.clear()

    async def resync(self) -> None:
        rows = await self._snapshot()
        self._by_hash = {digest: key_id for digest, key_id in rows}
        self._unknown.clear()
        self.loaded = True
