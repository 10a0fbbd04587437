"""Bindings kept by one node only: how routers without shared state behave.

Used by `affinity.store: memory` (the demo's comparison) and by the unit tests, which run the
engine on it; tests/integration/test_store_contract.py holds it to the same contract as the
Postgres store. Expiry uses this process's monotonic clock; there is no other node to agree
with.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from affinity_node.routing.ports import (
    NO_MEMBERS,
    BindingRow,
    Changes,
    CreateResult,
    Members,
    Pair,
    RowTuple,
    SnapshotPage,
    StoredBinding,
)


@dataclass(slots=True)
class _Row:
    backend: str
    version: int
    expires: float
    fanout: Members = NO_MEMBERS


class MemoryBindingStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._rows: dict[Pair, _Row] = {}
        self._versions = itertools.count(1)
        self._last_version = 0
        self._clock = clock

    def _next_version(self) -> int:
        self._last_version = next(self._versions)
        return self._last_version

    def _live(self, pair: Pair) -> StoredBinding | None:
        row = self._rows.get(pair)
        if row is None:
            return None
        ttl = row.expires - self._clock()
        return StoredBinding(row.backend, row.version, ttl, row.fanout) if ttl > 0 else None

    async def read(self, pair: Pair) -> StoredBinding | None:
        return self._live(pair)

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        found = self._live(pair)
        if found is not None:
            return CreateResult(found, False, 0.0)
        self._rows[pair] = _Row(choose(), self._next_version(), self._clock() + ttl)
        stored = self._live(pair)
        assert stored is not None
        return CreateResult(stored, True, 0.0)

    async def rebind(self, pair: Pair, old: str, new: str, ttl: float) -> StoredBinding | None:
        found = self._live(pair)
        if found is None or found.backend != old:
            return None
        fanout = tuple(m for m in found.fanout if m != new)
        self._rows[pair] = _Row(new, self._next_version(), self._clock() + ttl, fanout)
        return self._live(pair)

    async def set_members(self, pair: Pair, version: int, fanout: Members) -> StoredBinding | None:
        row = self._rows.get(pair)
        if row is None or row.version != version or self._live(pair) is None:
            return None
        row.fanout = tuple(fanout)
        row.version = self._next_version()
        return self._live(pair)

    async def refresh(self, items: Sequence[tuple[Pair, str]], ttl: float) -> list[BindingRow]:
        out = []
        for pair, backend in items:
            found = self._live(pair)
            if found is not None and found.backend == backend:
                self._rows[pair].expires = self._clock() + ttl
                out.append(BindingRow(pair[0], pair[1], backend, found.version, ttl, found.fanout))
        return out

    async def snapshot_page(self, after: Pair | None, limit: int) -> SnapshotPage:
        pairs = sorted(p for p in self._rows if after is None or p > after)
        out: list[RowTuple] = []
        for pair in pairs:
            if len(out) >= limit:
                break
            found = self._live(pair)
            if found is not None:
                fanout = list(found.fanout) or None
                out.append((pair[0], pair[1], found.backend, found.version, found.ttl, fanout))
        return SnapshotPage.of(out)

    async def changes_since(self, version: int, limit: int) -> Changes | None:
        """Rows are never deleted here while live (only expired ones, silently), so the
        changes are the newer rows."""
        now = self._clock()
        rows: list[RowTuple] = [
            (p[0], p[1], r.backend, r.version, r.expires - now, list(r.fanout) or None)
            for p, r in self._rows.items()
            if r.version > version
        ]
        return None if len(rows) > limit else Changes(rows, [])

    async def estimate_bindings(self) -> int:
        return len(self._rows)

    async def trim_deletions(self, older_than_s: float, batch: int) -> int | None:
        return 0

    async def snapshot(self, limit: int) -> list[BindingRow]:
        """Every live binding (tests and the mover's view in unit tests)."""
        rows = []
        for pair in list(self._rows):
            found = self._live(pair)
            if found is not None:
                rows.append(
                    BindingRow(
                        pair[0], pair[1], found.backend, found.version, found.ttl, found.fanout
                    )
                )
        return rows[:limit]

    async def ping(self) -> None:
        return None

    async def version_now(self) -> int:
        return self._last_version

    async def server_started_at(self) -> float:
        return 0.0

    async def delete_expired(self, batch: int) -> int | None:
        now = self._clock()
        expired = [p for p, row in self._rows.items() if row.expires <= now][:batch]
        for pair in expired:
            del self._rows[pair]
        return len(expired)
