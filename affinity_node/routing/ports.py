"""What the affinity engine needs from a binding store, and the values that cross that line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from affinity_node.vocabulary import DbOperation, NotifyOp

Pair = tuple[UUID, str]
"""(api key id, canonical model name): the unit of stickiness."""

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never goes backwards (time.monotonic in production;
tests inject one they advance by hand)."""


@dataclass(frozen=True, slots=True)
class StoredBinding:
    """A binding as the database sees it; `ttl` is seconds left, by the database clock."""

    backend: str
    version: int
    ttl: float


@dataclass(frozen=True, slots=True)
class BindingRow:
    api_key_id: UUID
    model: str
    backend: str
    version: int
    ttl: float


@dataclass(frozen=True, slots=True)
class CreateResult:
    binding: StoredBinding
    created: bool
    lock_wait: float


class StoreUnavailable(Exception):
    """The database did not answer in time or refused: callers degrade, never fail."""

    def __init__(
        self,
        operation: DbOperation,
        cause: BaseException | None = None,
        *,
        down: bool = True,
        lock_wait: float | None = None,
    ) -> None:
        super().__init__(f"binding store unavailable during {operation}: {cause!r}")
        self.operation = operation
        self.down = down
        """True when the database itself looks unreachable or overloaded (not one busy lock,
        not a saturated pool)."""
        self.lock_wait = lock_wait
        """Set when the pair's lock stayed busy past the lock timeout: how long it waited."""


class BindingStore(Protocol):
    async def read(self, pair: Pair) -> StoredBinding | None:
        """The live binding, lock-free; None when absent or expired."""

    async def create_if_absent(
        self, pair: Pair, choose: Callable[[], str], ttl: float
    ) -> CreateResult:
        """Lock the pair, re-check, insert `choose()` if still absent. One winner fleet-wide."""

    async def rebind(self, pair: Pair, old: str, new: str, ttl: float) -> StoredBinding | None:
        """Compare-and-set move from `old` to `new`; None when the row no longer points at old."""

    async def refresh(self, items: Sequence[tuple[Pair, str]], ttl: float) -> list[BindingRow]:
        """Extend live bindings that still point at the given backend; returns those extended."""

    async def snapshot(self, limit: int) -> list[BindingRow]:
        """The freshest live bindings, at most `limit`."""

    async def delete_expired(self, batch: int) -> int | None:
        """Delete up to `batch` expired rows; None when another node holds the cleaner lock."""

    async def ping(self) -> None:
        """A round trip that proves the store answers (the breaker's trial)."""

    async def version_now(self) -> int:
        """The newest version the store has handed out (a bound for plausible versions)."""


@dataclass(frozen=True, slots=True)
class BindingEvent:
    """A committed change to one binding, as every node hears it."""

    op: NotifyOp
    pair: Pair
    backend: str
    version: int
    ttl: float
    sent_at: float
    """Database clock (epoch seconds) when the trigger fired."""
