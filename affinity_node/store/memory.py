"""Bindings kept by one node only: how routers without shared state behave.

Used by `affinity.store: memory` (the demo's comparison) and as a fast stand-in for the
store port. Expiry uses this process's monotonic clock; there is no other node to agree with.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

from affinity_node.routing.ports import BindingRow, CreateResult, Pair, StoredBinding


class MemoryBindingStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._rows: dict[Pair, tuple[str, int, float]] = {}
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
        ttl = row[2] - self._clock()
        return StoredBinding(row[0], row[1], ttl) if ttl > 0 else None

    async def read(self, pair: Pair) -> StoredBinding | None:
        return self._live(pair)

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        found = self._live(pair)
        if found is not None:
            return CreateResult(found, False, 0.0)
        self._rows[pair] = (choose(), self._next_version(), self._clock() + ttl)
        stored = self._live(pair)
        assert stored is not None
        return CreateResult(stored, True, 0.0)

    async def rebind(self, pair: Pair, old: str, new: str, ttl: float) -> StoredBinding | None:
        found = self._live(pair)
        if found is None or found.backend != old:
            return None
        self._rows[pair] = (new, self._next_version(), self._clock() + ttl)
        return self._live(pair)

    async def refresh(self, items: Sequence[tuple[Pair, str]], ttl: float) -> list[BindingRow]:
        out = []
        for pair, backend in items:
            found = self._live(pair)
            if found is not None and found.backend == backend:
                self._rows[pair] = (backend, found.version, self._clock() + ttl)
                out.append(BindingRow(pair[0], pair[1], backend, found.version, ttl))
        return out

    async def snapshot(self, limit: int) -> list[BindingRow]:
        rows = []
        for pair in list(self._rows):
            found = self._live(pair)
            if found is not None:
                rows.append(BindingRow(pair[0], pair[1], found.backend, found.version, found.ttl))
        return rows[:limit]

    async def ping(self) -> None:
        return None

    async def version_now(self) -> int:
        return self._last_version

    async def delete_expired(self, batch: int) -> int | None:
        now = self._clock()
        expired = [p for p, row in self._rows.items() if row[2] <= now][:batch]
        for pair in expired:
            del self._rows[pair]
        return len(expired)
