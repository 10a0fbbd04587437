"""Which key id a bearer secret belongs to, without a database trip per request.

The node holds every active key's SHA-256, loaded after LISTEN like the bindings, and follows
`api_key_changes`: a revocation or deletion removes the key at once, a creation loads that one
key. While the set is in sync (listener up, snapshot loaded), a token it does not know is
refused from memory: a flood of random tokens costs the database nothing. While it is not
(listener down, or before the first snapshot), an unknown token is looked up, one lookup per
token at a time, at most `lookups_per_s` per node, and remembered as unknown for a while.

Revocation wins every race. Events that arrive while a snapshot is being read are applied
again after it (the snapshot may predate them); a lookup or load that was in flight when a
key was revoked is discarded (each revocation is stamped with an event sequence number, and a
result older than the key's latest revocation is not cached). While the listener is down,
the active set is re-read every poll, so revocations still take effect.

Notifications are untrusted input (any role that can connect can send one): a revocation
removes the key at once (failing closed) and is then checked against the table; a forged one
is undone a round trip later. A creation only ever loads what the table holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Protocol
from uuid import UUID

from affinity_node.auth.secrets import hash_secret
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.vocabulary import KeyEventOp, KeyLookupReason, KeyRefusal

log = logging.getLogger(__name__)


class KeyStore(Protocol):
    async def lookup(self, digest: bytes) -> tuple[UUID, bool] | None:
        """hash -> (key id, revoked), or None when no such key."""

    async def load(self, key_id: UUID) -> tuple[bytes, bool] | None:
        """key id -> (hash, revoked), or None when no such key."""

    async def active(self) -> list[tuple[bytes, UUID]]:
        """Every usable key, by hash."""


class InvalidKey(Exception):
    """Unknown, malformed or revoked key: 401."""


class KeysUnavailable(Exception):
    """The key is not known and cannot be checked right now: 503, try again."""


class _Bucket:
    """`rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyCache:
    def __init__(
        self,
        store: KeyStore,
        metrics: AffinityMetrics | None = None,
        *,
        lookups_per_s: float = 20.0,
        max_unknown: int = 10_000,
        unknown_ttl_s: float = 60.0,
        max_revoked: int = 100_000,
        blind_grace_s: float = 3.0,
        verify_timeout_s: float = 0.5,
    ) -> None:
        self._store = store
        self._m = metrics
        self._by_hash: dict[bytes, UUID] = {}
        self._hash_of: dict[UUID, bytes] = {}
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        self._max_unknown = max_unknown
        self._unknown_ttl = unknown_ttl_s
        self._bucket = _Bucket(lookups_per_s, max(lookups_per_s, 1.0))
        self._inflight: dict[bytes, asyncio.Future[UUID | None]] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._revoked_at: OrderedDict[UUID, int] = OrderedDict()
        """key id -> sequence number of its latest revocation or deletion."""
        self._max_revoked = max_revoked
        self._during_snapshot: list[tuple[KeyEventOp, UUID]] | None = None
        self._listener_up = False
        self._blind_since = time.monotonic()
        self._blind_grace = blind_grace_s
        self._verify_timeout = verify_timeout_s
        self.loaded = False
        """True once a snapshot of the active keys has been loaded."""

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def in_sync(self) -> bool:
        """The set is complete and followed: an unknown token is refused from memory."""
        return self.loaded and self._listener_up

    # -- the request path --------------------------------------------------------------------

    async def authenticate(self, secret: str) -> UUID:
        digest = hash_secret(secret)
        key_id = self._by_hash.get(digest)
        if key_id is not None:
            return key_id
        if self._loads:  # a key created a moment ago may be loading: let it land first
            await asyncio.wait(list(self._loads), timeout=1.0)
            key_id = self._by_hash.get(digest)
            if key_id is not None:
                return key_id
        if self.in_sync:
            self._refused("unknown")
            raise InvalidKey
        until = self._unknown.get(digest)
        if until is not None and until > time.monotonic():
            self._refused("unknown")
            raise InvalidKey
        future = self._inflight.get(digest)
        if future is None:  # one lookup per unknown secret, however many requests carry it
            if not self._bucket.take():
                self._refused("rate_limited")
                raise KeysUnavailable
            future = asyncio.ensure_future(self._lookup(digest))
            self._inflight[digest] = future
            future.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        try:
            found = await asyncio.shield(future)
        except Exception as exc:
            self._refused("unavailable")
            raise KeysUnavailable from exc
        if found is None:
            self._refused("unknown")
            raise InvalidKey
        return found

    async def _lookup(self, digest: bytes) -> UUID | None:
        started = self._seq
        self._count("unknown")
        found = await self._store.lookup(digest)
        if found is None or found[1] or self._revoked_since(found[0], started):
            self._unknown[digest] = time.monotonic() + self._unknown_ttl
            self._unknown.move_to_end(digest)
            if len(self._unknown) > self._max_unknown:
                self._unknown.popitem(last=False)
            return None
        self._add(digest, found[0])
        return found[0]

    # -- events ------------------------------------------------------------------------------

    def on_event(self, op: KeyEventOp, key_id: UUID) -> None:
        """A committed change to api_keys, in commit order."""
        self._seq += 1
        if self._during_snapshot is not None:
            self._during_snapshot.append((op, key_id))
        self._apply(op, key_id)

    def _apply(self, op: KeyEventOp, key_id: UUID) -> None:
        if op in ("revoke", "delete"):
            # Results of reads that began before this event are void from now on.
            self._revoked_at[key_id] = self._seq
            self._revoked_at.move_to_end(key_id)
            if len(self._revoked_at) > self._max_revoked:
                self._revoked_at.popitem(last=False)
            digest = self._hash_of.pop(key_id, None)
            if digest is not None:
                self._by_hash.pop(digest, None)
                self._spawn(self._verify_removal(key_id, digest, self._seq))
        else:  # create, restore: that one key becomes usable
            self._unknown.clear()
            self._spawn(self._load(key_id))

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    async def _verify_removal(self, key_id: UUID, digest: bytes, seq: int) -> None:
        """Put the key back if the table says it is active: the notification was forged."""
        self._count("verify")
        try:
            async with asyncio.timeout(self._verify_timeout):
                found = await self._store.load(key_id)
        except Exception:
            return  # cannot tell: it stays out (failing closed) until the next snapshot
        active = found is not None and not found[1] and found[0] == digest
        if active and self._revoked_at.get(key_id) == seq:  # and no revocation since
            self._add(digest, key_id)

    async def _load(self, key_id: UUID) -> None:
        started = self._seq
        self._count("created")
        try:
            found = await self._store.load(key_id)
        except Exception as exc:  # the next snapshot or lookup will know it
            log.warning("could not load a new API key: %r", exc)
            return
        if found is not None and not found[1] and not self._revoked_since(key_id, started):
            self._add(found[0], key_id)

    def _revoked_since(self, key_id: UUID, seq: int) -> bool:
        return self._revoked_at.get(key_id, -1) > seq

    def _add(self, digest: bytes, key_id: UUID) -> None:
        self._by_hash[digest] = key_id
        self._hash_of[key_id] = digest

    # -- snapshots and the listener ----------------------------------------------------------

    async def resync(self) -> None:
        """Load the active set (the listener calls this after each LISTEN); events that arrive
        meanwhile are applied again afterwards, so the snapshot cannot undo a revocation."""
        self._during_snapshot = []
        try:
            rows = await self._store.active()
        finally:
            seen, self._during_snapshot = self._during_snapshot, None
        self._replace(rows)
        for op, key_id in seen or ():
            self._apply(op, key_id)
        self.loaded = True

    def _replace(self, rows: list[tuple[bytes, UUID]]) -> None:
        self._by_hash = dict(rows)
        self._hash_of = {key_id: digest for digest, key_id in rows}
        self._unknown.clear()

    def listener_state(self, up: bool) -> None:
        self._listener_up = up
        if not up:
            self._blind_since = time.monotonic()

    async def poll_while_blind(self) -> bool:
        """Re-read the active set when the listener has been down past the grace period, so
        revocations still arrive; True when it polled."""
        if self._listener_up or not self.loaded:
            return False
        if time.monotonic() - self._blind_since < self._blind_grace:
            return False
        started = self._seq
        self._count("poll")
        rows = await self._store.active()
        if self._listener_up:  # the listener came back meanwhile: its snapshot is newer
            return False
        self._replace([(d, k) for d, k in rows if not self._revoked_since(k, started)])
        return True

    # -- metrics -----------------------------------------------------------------------------

    def _count(self, reason: KeyLookupReason) -> None:
        if self._m is not None:
            self._m.key_lookups.labels(reason).inc()

    def _refused(self, reason: KeyRefusal) -> None:
        if self._m is not None:
            self._m.keys_refused.labels(reason).inc()
