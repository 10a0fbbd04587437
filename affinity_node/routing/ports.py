"""The routing layer's ports: what it needs from the adapters below the node (the binding store
for the engine, the fleet-wide move slot and binding queries for the mover) and the values that
cross that line (rows, snapshot pages, events, registry entries). Adapters implement these
(store/postgres.py, store/memory.py, store/registry.py); routing imports no adapter."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID

from affinity_node.vocabulary import BackendKind, BackendState, DbOperation, NotifyOp

Pair = tuple[UUID, str]
"""(api key id, canonical model name): the unit of stickiness."""

Members = tuple[str, ...]
"""A binding set's members after its first backend, oldest first (empty: one backend)."""

NO_MEMBERS: Members = ()

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never goes backwards (time.monotonic in production;
tests inject one they advance by hand)."""


@dataclass(frozen=True, slots=True)
class StoredBinding:
    """A binding as the database sees it; `ttl` is seconds left, by the database clock."""

    backend: str
    version: int
    ttl: float
    fanout: Members = NO_MEMBERS
    """The set's other members (load-aware fan-out), oldest first."""


@dataclass(frozen=True, slots=True)
class BindingRow:
    api_key_id: UUID
    model: str
    backend: str
    version: int
    ttl: float
    fanout: Members = NO_MEMBERS


RowTuple = tuple[UUID, str, str, int, float, "Sequence[str] | None"]
"""(api key id, model, backend, version, ttl, other members or None): a row of a snapshot page
or a catch-up as the store returns it, unpacked where it is used (a million of them are read
at start: no object of ours per row)."""


@dataclass(frozen=True, slots=True)
class SnapshotPage:
    """One page of a full snapshot, column by column, in key order: a million rows arrive at
    start, and an object per row (and per value) would cost the node more than the database
    spends on them."""

    keys: array[int]
    """Two per row ('Q'): the key id's high and low 64 bits."""
    models: Sequence[str]
    backends: Sequence[str]
    """Each row's provider_url (a set's first member)."""
    versions: array[int]
    ttls: array[float]
    sets: Mapping[tuple[int, str], Members] = field(default_factory=dict)
    """(key id as an int, model) -> the other members, for the rows that have any."""

    @property
    def rows(self) -> int:
        return len(self.models)

    @property
    def last(self) -> Pair | None:
        """The page's greatest pair: the next page starts after it."""
        if not self.models:
            return None
        return (UUID(int=self.keys[-2] << 64 | self.keys[-1]), self.models[-1])

    @classmethod
    def of(cls, rows: Sequence[RowTuple]) -> SnapshotPage:
        """A page from rows in key order (the memory store, tests)."""
        keys: array[int] = array("Q")
        for r in rows:
            keys.extend((r[0].int >> 64, r[0].int & 0xFFFFFFFFFFFFFFFF))
        return cls(
            keys,
            [r[1] for r in rows],
            [r[2] for r in rows],
            array("q", (r[3] for r in rows)),
            array("d", (r[4] for r in rows)),
            {(r[0].int, r[1]): tuple(r[5]) for r in rows if r[5]},
        )


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed in the table after a version: a catch-up instead of a snapshot."""

    rows: Sequence[RowTuple]
    """Rows whose version is newer (expired ones included, with a TTL <= 0)."""
    deleted: Sequence[tuple[Pair, int]]
    """Pairs deleted while live, with the delete's version (from the deletion log)."""


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

    async def set_members(self, pair: Pair, version: int, fanout: Members) -> StoredBinding | None:
        """Grow or shrink a set: under the pair's lock, replace its other members if the row
        is still at `version`; None when someone changed it first (concurrent decisions on
        many nodes change a set once)."""

    async def refresh(self, items: Sequence[tuple[Pair, str]], ttl: float) -> list[BindingRow]:
        """Extend live bindings that still point at the given backend; returns those extended."""

    async def snapshot_page(self, after: Pair | None, limit: int) -> SnapshotPage:
        """Up to `limit` live bindings following `after` in key order (None: from the start):
        one bounded statement per page, resumable from the last pair read."""

    async def changes_since(self, version: int, limit: int) -> Changes | None:
        """Rows changed after `version` and deletions after it, read in one snapshot; None
        when the deletion log no longer reaches back that far or more than `limit` rows
        changed (a full snapshot is then the cheaper way)."""

    async def estimate_bindings(self) -> int:
        """About how many rows the table holds (for progress reports; no table scan)."""

    async def delete_expired(self, batch: int) -> int | None:
        """Delete up to `batch` expired rows; None when another node holds the cleaner lock."""

    async def trim_deletions(self, older_than_s: float, batch: int) -> int | None:
        """Forget up to `batch` deletion-log entries older than `older_than_s` (nodes that
        were away longer reload fully); None when another node holds the cleaner lock."""

    async def ping(self) -> None:
        """A round trip that proves the store answers (the breaker's trial)."""

    async def version_now(self) -> int:
        """The newest version the store has handed out (a bound for plausible versions)."""

    async def server_started_at(self) -> float:
        """When the database server started (epoch seconds): a restart, a restore or a
        failover may have lost changes a watermark counted on."""


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
    fanout: Members = NO_MEMBERS


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    url: str
    added: bool
    """False: the entry only holds the admin state of a backend the YAML lists."""
    kind: BackendKind
    models: tuple[str, ...]
    state: BackendState
    drain_deadline: datetime | None = None


class MoverStore(Protocol):
    """What the mover needs from the database (store/postgres.py): the fleet's one move slot
    and the bindings to move."""

    async def take_move_slot(self, min_interval_s: float) -> bool: ...

    async def on_backends(self, urls: Sequence[str], limit: int) -> list[BindingRow]: ...

    async def idle_bindings(self, url: str, limit: int) -> list[BindingRow]: ...
