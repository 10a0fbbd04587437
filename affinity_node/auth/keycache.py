"""Which key id a bearer secret belongs to, without a database trip per request.

The node holds every active key's SHA-256, loaded after LISTEN like the bindings, and follows
`api_key_changes`: a revocation or deletion removes the key at once, a creation loads that one
key. While the set is in sync (listener up, snapshot loaded), a token it does not know is
refused from memory: a flood of random tokens costs the database nothing. While it is not
(listener down, or before the first snapshot), an unknown token is looked up, one lookup per
token at a time, at most `lookups_per_s` per node, and remembered as unknown for a while.

A notification is a doorbell (any role that can connect can send one): a create, restore,
revoke or delete names a key to read again, and only the row read decides. Those reads are
coalesced and batched (one statement for up to `check_batch` keys, at most `checks_per_s`
statements a second, failed ones retried with backoff), so a flood of forged notifications
costs a bounded trickle of reads and never refuses a live key; a real revocation takes effect
one batched read after its notification. Revocation still wins every race: a lookup or
snapshot that was in flight when a key's change was notified does not add it unless the check
after that notification found it active. A periodic resync (jittered) bounds how long any
missed change can last; while the listener is down the active set is re-read every poll.

The set is a `KeyTable` (auth/keytable.py: packed digests and ids, no object per key), read in
pages of packed rows into a new table while the old one serves, then swapped in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from uuid import UUID

from affinity_node.auth.keytable import KeyTable, KeyTableLoad
from affinity_node.auth.ports import KeyStore
from affinity_node.auth.secrets import hash_secret
from affinity_node.observability.logs import RateLimitedLog
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.tasks import Periodic, every, stop_all
from affinity_node.vocabulary import KeyEventOp, KeyLookupReason, KeyRefusal

log = logging.getLogger(__name__)


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

    def delay(self) -> float:
        """Seconds until a token is there (0: now)."""
        now = time.monotonic()
        tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        return max(0.0, (1.0 - tokens) / self._rate)

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
        checks_per_s: float = 20.0,
        check_batch: int = 1000,
        max_pending: int = 10_000,
        retry_s: float = 0.05,
        resync_interval_s: float = 45.0,
        page: int = 50_000,
    ) -> None:
        self._store = store
        self._m = metrics
        self._keys = KeyTable()
        self._page = page
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        self._max_unknown = max_unknown
        self._unknown_ttl = unknown_ttl_s
        self._bucket = _Bucket(lookups_per_s, max(lookups_per_s, 1.0))
        self._inflight: dict[bytes, asyncio.Future[UUID | None]] = {}
        self._pending: dict[UUID, int] = {}
        """key id -> sequence number of its latest notification not yet checked."""
        self._to_read: dict[UUID, int] = {}
        """The part of `_pending` no check has started on yet."""
        self._overflow = False
        """Too many keys named at once: the next check re-reads the whole active set."""
        self._checker: asyncio.Task[None] | None = None
        self._upkeep: Periodic | None = None
        self._checked = asyncio.Event()
        """Set (and replaced) after every check: waiters look again."""
        self._check_bucket = _Bucket(checks_per_s, max(checks_per_s, 1.0))
        self._check_batch = check_batch
        self._max_pending = max_pending
        self._retry_s = retry_s
        self._resync_interval = resync_interval_s
        self._next_resync = time.monotonic() + self._jittered()
        self._warn = RateLimitedLog(log)
        self._seq = 0
        self._revoked_at: OrderedDict[UUID, int] = OrderedDict()
        """key id -> sequence number of its latest revocation or deletion."""
        self._max_revoked = max_revoked
        self._during_snapshot: list[tuple[KeyEventOp, UUID]] | None = None
        self._listener_up = False
        self._blind_since = time.monotonic()
        self._blind_grace = blind_grace_s
        self.loaded = False
        """True once a snapshot of the active keys has been loaded."""
        self.resyncs = 0
        """Snapshots of the active keys loaded so far (the first, then the periodic ones)."""
        self.on_change: Callable[[UUID | None], None] | None = None
        """Told of every key a notification names (None: all of them, after a resync), so
        the limiter re-reads their limits."""

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def in_sync(self) -> bool:
        """The set is complete and followed: an unknown token is refused from memory."""
        return self.loaded and self._listener_up

    # -- the request path --------------------------------------------------------------------

    async def authenticate(self, secret: str) -> UUID:
        digest = hash_secret(secret)
        key_id = self._keys.get(digest)
        if key_id is not None:
            return key_id
        if self._pending:  # a key created a moment ago may be being read: let it land first
            await self._wait_checks(lambda: self._keys.get(digest) is not None, 1.0)
            key_id = self._keys.get(digest)
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
        if found is not None and self._pending_since(found[0], started):
            # Its row changed since this read began: only the check after that decides.
            key_id = found[0]
            await self._wait_checks(lambda: not self._pending_since(key_id, started), 1.0)
            if self._pending_since(key_id, started):
                raise KeysUnavailable
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
        if self.on_change is not None:
            self.on_change(key_id)
        if op == "limits":  # the key's limit rows changed, not the key
            return
        self._seq += 1
        if self._during_snapshot is not None:
            self._during_snapshot.append((op, key_id))
        self._apply(op, key_id)

    def _apply(self, _op: KeyEventOp, key_id: UUID) -> None:
        """Whatever the notification says, the key is read again; nothing changes before."""
        if self._overflow:
            return
        if key_id not in self._pending and len(self._pending) >= self._max_pending:
            # A flood (real ones never come this fast): one read of the active set instead.
            self._overflow = True
            self._to_read.clear()
            return
        self._pending[key_id] = self._seq
        self._to_read[key_id] = self._seq
        self._unknown.clear()
        # A checker that has returned but whose done callback has not run yet reads no more.
        if self._checker is None or self._checker.done():
            self._checker = asyncio.get_running_loop().create_task(self._check_loop())
            self._checker.add_done_callback(self._checker_ended)

    def _checker_ended(self, task: asyncio.Task[None]) -> None:
        if self._checker is task:
            self._checker = None
        if not task.cancelled() and task.exception() is not None:
            log.error("API key checks failed", exc_info=task.exception())

    async def _check_loop(self) -> None:
        """Reads the named keys in batches, rate-bounded, retrying failed reads with backoff
        (jittered) until they answer: a database hiccup delays a new key, never loses it."""
        pause = self._retry_s
        while self._to_read or self._overflow:
            await asyncio.sleep(self._check_bucket.delay())
            self._check_bucket.take()
            try:
                if self._overflow:
                    await self._check_all()
                else:
                    await self._check_batch_once()
            except Exception as exc:
                self._count_failure(exc)
                await asyncio.sleep(pause * random.uniform(1.0, 1.5))
                pause = min(pause * 2, 5.0)
                continue
            finally:
                self._checked.set()
                self._checked = asyncio.Event()
            pause = self._retry_s

    async def _check_batch_once(self) -> None:
        batch = dict(list(self._to_read.items())[: self._check_batch])
        for key_id in batch:
            del self._to_read[key_id]
        self._count("verify")
        try:
            rows = await self._store.load_many(list(batch))
        except BaseException:
            for key_id, seq in batch.items():  # read them again (newer events kept)
                self._to_read.setdefault(key_id, seq)
            raise
        for key_id, seq in batch.items():
            found = rows.get(key_id)
            if found is not None and not found[1]:
                if not self._revoked_since(key_id, seq):
                    self._add(found[0], key_id)
            else:
                self._remove(key_id, seq)
            if self._pending.get(key_id) == seq:
                del self._pending[key_id]

    async def _check_all(self) -> None:
        """After an overflow: the active set decides every key named meanwhile."""
        self._overflow = False
        started = self._seq
        named = dict(self._pending)
        self._count("poll")
        try:
            active = await self._read_active()
        except BaseException:
            self._overflow = True
            raise
        for key_id, seq in named.items():
            digest = active.digest_of(key_id)
            if digest is None:
                self._remove(key_id, seq)
            elif not self._revoked_since(key_id, seq):
                self._add(digest, key_id)
            if self._pending.get(key_id) == seq and key_id not in self._to_read:
                del self._pending[key_id]
        self._replace(self._without_revoked(active, started))

    def _remove(self, key_id: UUID, seq: int) -> None:
        """The table says the key is revoked or gone (as of a read after notification
        `seq`): results of reads that began before it are void from now on."""
        if self._revoked_at.get(key_id, -1) < seq:
            self._revoked_at[key_id] = seq
            self._revoked_at.move_to_end(key_id)
            if len(self._revoked_at) > self._max_revoked:
                self._revoked_at.popitem(last=False)
        self._keys.remove(key_id)

    async def _wait_checks(self, done: Callable[[], bool], timeout: float) -> None:
        """Until `done()` or no check is pending, at most `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not done() and (self._pending or self._overflow):
                    await self._checked.wait()

    def _pending_since(self, key_id: UUID, seq: int) -> bool:
        """A notification named the key after `seq` and its check has not answered yet."""
        return self._pending.get(key_id, -1) > seq

    def _count_failure(self, exc: Exception) -> None:
        self._warn.warning("key-check", "cannot read API keys (retrying): %r", exc)

    def _revoked_since(self, key_id: UUID, seq: int) -> bool:
        return self._revoked_at.get(key_id, -1) > seq

    def _add(self, digest: bytes, key_id: UUID) -> None:
        self._keys.add(digest, key_id)

    # -- snapshots and the listener ----------------------------------------------------------

    async def resync(self) -> None:
        """Load the active set (the listener calls this after each LISTEN); events that arrive
        meanwhile are applied again afterwards, so the snapshot cannot undo a revocation."""
        started = self._seq
        self._during_snapshot = []
        try:
            active = await self._read_active()
        finally:
            seen, self._during_snapshot = self._during_snapshot, None
        self._replace(self._without_revoked(active, started))
        for op, key_id in seen or ():
            self._apply(op, key_id)
        self.loaded = True
        self.resyncs += 1
        if self.on_change is not None:
            self.on_change(None)

    def start(self, every_s: float = 1.0) -> None:
        """`maintain` every `every_s`, until `stop` (a round that fails, the database probably
        down, is logged and tried again next time)."""
        self._upkeep = every(every_s, self.maintain, "keys-maintain")

    async def stop(self) -> None:
        """Ends the upkeep and the checks in flight (the node is stopping)."""
        task, self._checker = self._checker, None
        await stop_all(self._upkeep, task)
        self._upkeep = None

    def _jittered(self) -> float:
        return self._resync_interval * random.uniform(0.8, 1.2)

    async def maintain(self) -> bool:
        """Called about every second: polls while blind, and re-reads the active set every
        `resync_interval_s` (jittered) even when in sync, so a change whose notification or
        check was lost is not missed for longer. True when it read the table."""
        if await self.poll_while_blind():
            return True
        now = time.monotonic()
        if not self.in_sync or now < self._next_resync:
            return False
        self._next_resync = now + self._jittered()
        self._count("poll")
        try:
            await self.resync()
        except Exception:
            self._next_resync = now + min(5.0, self._resync_interval)  # soon, not at once
            raise
        return True

    async def _read_active(self) -> KeyTable:
        """The active set, page by page into a new table while the current one serves."""
        load = KeyTableLoad()
        after = UUID(int=0)
        while True:
            page = await self._store.active_page(after, self._page)
            load.add_page(page.digests, page.ids)
            if page.rows < self._page or page.last is None:
                return load.table()
            after = page.last

    def _without_revoked(self, table: KeyTable, started: int) -> KeyTable:
        """`table` less the keys revoked or deleted after notification `started`: the read may
        have seen them before their change committed. The revocation log is bounded, the
        table is not: the log is walked, not the table."""
        for key_id, seq in self._revoked_at.items():
            if seq > started:
                table.remove(key_id)
        return table

    def _replace(self, table: KeyTable) -> None:
        self._keys = table
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
        active = await self._read_active()
        if self._listener_up:  # the listener came back meanwhile: its snapshot is newer
            return False
        self._replace(self._without_revoked(active, started))
        return True

    # -- metrics -----------------------------------------------------------------------------

    def _count(self, reason: KeyLookupReason) -> None:
        if self._m is not None:
            self._m.key_lookups.labels(reason).inc()

    def _refused(self, reason: KeyRefusal) -> None:
        if self._m is not None:
            self._m.keys_refused.labels(reason).inc()
