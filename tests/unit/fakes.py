"""Test doubles for the unit tests: a clock moved by hand and stores that fail or stall on
purpose. The stores are the real MemoryBindingStore with one behaviour added each."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from uuid import UUID

from prometheus_client import CollectorRegistry

from affinity_node.auth.ports import KeyPage
from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.cache import BindingCache
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.engine_settings import EngineSettings
from affinity_node.routing.ports import CreateResult, Pair, StoredBinding, StoreUnavailable
from affinity_node.store.memory import MemoryBindingStore


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyStore(MemoryBindingStore):
    """Raises StoreUnavailable from every operation while `down`; counts the calls it got."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down = False
        self.calls = 0
        self.pings = 0
        self.hang: asyncio.Event | None = None
        """When set, a ping waits for it (a frozen host answers nothing)."""

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise StoreUnavailable("read", ConnectionRefusedError("test"))

    async def read(self, pair: Pair) -> StoredBinding | None:
        self._check()
        return await super().read(pair)

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        self._check()
        return await super().create_if_absent(pair, choose, ttl)

    async def rebind(self, pair: Pair, old: str, new: str, ttl: float) -> StoredBinding | None:
        self._check()
        return await super().rebind(pair, old, new, ttl)

    async def ping(self) -> None:
        self.pings += 1
        if self.hang is not None:
            await self.hang.wait()
        self._check()


class GatedStore(FlakyStore):
    """Holds every create until `gate` is set: concurrent callers pile up behind one trip."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        self.waiting += 1
        await self.gate.wait()
        return await super().create_if_absent(pair, choose, ttl)


class Chooser:
    """A fallback strategy over backend ids that records its calls (round robin)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, candidates: Sequence[str]) -> str:
        self.calls += 1
        return candidates[(self.calls - 1) % len(candidates)]


def make_engine(
    store: MemoryBindingStore, clock: Clock, max_entries: int = 0, **settings: float
) -> tuple[AffinityEngine, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = AffinityMetrics(registry)
    engine = AffinityEngine(
        store,
        BindingCache(max_entries=max_entries, clock=clock, on_evict=metrics.evicted),
        metrics,
        EngineSettings(**settings),  # type: ignore[arg-type]
        clock=clock,
        wall_clock=clock,
    )
    engine.listener_state(True)  # as if the listener had connected and synced
    return engine, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


KEY = UUID("00000000-0000-0000-0000-0000000000aa")
MODEL = "llama"
PAIR = (KEY, MODEL)
B1, B2, B3 = "http://b1:8000", "http://b2:8000", "http://b3:8000"


class MemoryKeyStore:
    """The api_keys table in memory; `gate` holds the next read until set (to force races)."""

    def __init__(self) -> None:
        self.rows: dict[UUID, tuple[bytes, bool]] = {}
        self.reads = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def _enter(self) -> None:
        self.reads += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()

    async def lookup(self, digest: bytes) -> tuple[UUID, bool] | None:
        await self._enter()
        for key_id, (d, revoked) in self.rows.items():
            if d == digest:
                return key_id, revoked
        return None

    async def load(self, key_id: UUID) -> tuple[bytes, bool] | None:
        await self._enter()
        return self.rows.get(key_id)

    async def load_many(self, key_ids: Sequence[UUID]) -> dict[UUID, tuple[bytes, bool]]:
        await self._enter()
        return {k: self.rows[k] for k in key_ids if k in self.rows}

    async def active_page(self, after: UUID, limit: int) -> KeyPage:
        """Packed in id order, as store/keys.py returns them."""
        await self._enter()
        page = sorted(
            (k, d) for k, (d, revoked) in self.rows.items() if not revoked and k.int > after.int
        )[:limit]
        return KeyPage(b"".join(d for _k, d in page), b"".join(k.bytes for k, _d in page))
