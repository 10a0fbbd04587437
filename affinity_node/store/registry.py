"""The backend registry on Postgres (db/migrations/0003): runtime backends, admin states, what
each node sees of backend health, and the fleet-wide pacing of binding moves.

Only an admin role writes the registry (deploy/postgres/roles.sql); a row is still checked
against `backends.allow` before a node uses it, so a backend outside the list is never
probed, routed to or fetched, whoever wrote it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import asyncpg

from affinity_node.config import HostAllowList
from affinity_node.observability.logs import RateLimitedLog
from affinity_node.routing.backends import BackendPool
from affinity_node.routing.lifecycle import apply_registry
from affinity_node.routing.ports import BindingRow, RegistryEntry
from affinity_node.store.postgres import DB_ERRORS
from affinity_node.store.queries import QUERIES as Q
from affinity_node.tasks import stop_all
from affinity_node.vocabulary import BackendKind, BackendState

log = logging.getLogger(__name__)

REGISTRY_CHANNEL = "affinity_backend_changes"


@dataclass(frozen=True, slots=True)
class NodesView:
    """One backend as the nodes report it."""

    healthy_on: int
    nodes: int
    kind: BackendKind
    models: tuple[str, ...]
    inflight: int = 0
    """Requests the reporting nodes had in flight to it at their last report."""


def _row(r: asyncpg.Record) -> RegistryEntry:
    return RegistryEntry(
        r["url"],
        r["added"],
        cast(BackendKind, r["kind"]),
        tuple(r["models"]),
        cast(BackendState, r["state"]),
        r["drain_deadline"],
    )


def _binding(r: asyncpg.Record) -> BindingRow:
    return BindingRow(r[0], r[1], r[2], r[3], r[4], tuple(r[5]))


MAX_REPORTED_MODELS = 64
MAX_REPORTED_BYTES = 4000
"""The CHECK of affinity_backend_health.models: names, and bytes joined by spaces."""


def reportable(models: Iterable[str]) -> list[str]:
    """The first names (sorted) that fit the models column: a vllm backend lists every LoRA
    adapter it holds, and a refused report would hide the backend's health from `backends
    list`."""
    kept: list[str] = []
    size = -1
    for name in sorted(models)[:MAX_REPORTED_MODELS]:
        size += len(name.encode()) + 1
        if size > MAX_REPORTED_BYTES:
            break
        kept.append(name)
    return kept


class PostgresRegistry:
    """Every call is one short statement; callers decide what a failure means."""

    def __init__(self, db: asyncpg.Pool | asyncpg.Connection, timeout_s: float = 2.0) -> None:
        self._db = db
        self._timeout = timeout_s

    async def rows(self) -> list[RegistryEntry]:
        return [_row(r) for r in await self._db.fetch(Q["registry_list"], timeout=self._timeout)]

    async def add(self, url: str, kind: BackendKind, models: Sequence[str]) -> None:
        await self._db.execute(Q["registry_add"], url, kind, list(models), timeout=self._timeout)

    async def set_state(
        self, url: str, state: BackendState, drain_deadline: datetime | None = None
    ) -> bool:
        """Returns whether the registry added this backend (False: the YAML lists it)."""
        added: bool = await self._db.fetchval(
            Q["registry_set_state"], url, state, drain_deadline, timeout=self._timeout
        )
        return added

    async def remove(self, url: str) -> bool | None:
        """Deletes the row; None when there was none, else whether the registry added it."""
        added: bool | None = await self._db.fetchval(
            Q["registry_remove"], url, timeout=self._timeout
        )
        return added

    async def bindings(self) -> dict[str, int]:
        """Live bindings per backend, set members included."""
        rows = await self._db.fetch(Q["registry_bindings"], timeout=self._timeout)
        return {r["url"]: r["bindings"] for r in rows}

    async def report_health(
        self,
        node_id: str,
        url: str,
        healthy: bool,
        kind: BackendKind,
        models: Iterable[str],
        inflight: int = 0,
    ) -> None:
        await self._db.execute(
            Q["health_report"],
            node_id,
            url,
            healthy,
            kind,
            reportable(models),
            inflight,
            timeout=self._timeout,
        )

    async def health(self) -> dict[str, NodesView]:
        """What the nodes that reported in the last 90 s know and see of each backend."""
        rows = await self._db.fetch(Q["health_view"], timeout=self._timeout)
        return {
            r["url"]: NodesView(
                r["healthy"],
                r["nodes"],
                cast(BackendKind, r["kind"]),
                tuple(r["models"]),
                r["inflight"] or 0,
            )
            for r in rows
        }

    async def take_move_slot(self, min_interval_s: float) -> bool:
        """Whether this caller may move one binding now (one move per interval, fleet-wide)."""
        return bool(await self._db.fetchval(Q["mover_slot"], min_interval_s, timeout=self._timeout))

    async def on_backends(self, urls: Sequence[str], limit: int) -> list[BindingRow]:
        """Live bindings that hold any of `urls`, as first member or in the set."""
        rows = await self._db.fetch(
            Q["mover_drain_candidates"], list(urls), limit, timeout=self._timeout
        )
        return [_binding(r) for r in rows]

    async def idle_bindings(self, url: str, limit: int) -> list[BindingRow]:
        """Bindings on `url` alone, idle the longest first."""
        rows = await self._db.fetch(Q["mover_idle_bindings"], url, limit, timeout=self._timeout)
        return [_binding(r) for r in rows]


class RegistryFollower:
    """Keeps one node's backend pool equal to the registry: re-read on every notification
    (the payload is only a nudge) and after every (re)connect of the listener. Rows added for a
    host outside `allow` are left out (warned once each, counted in `refused`)."""

    def __init__(
        self,
        backend_registry: PostgresRegistry,
        backends: BackendPool,
        allow: HostAllowList | None = None,
    ) -> None:
        self._backend_registry = backend_registry
        self._backends = backends
        self._allow = allow or HostAllowList()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._warn = RateLimitedLog(log)
        self.refused: frozenset[str] = frozenset()
        """Registry backends this node will not use (their host is not in backends.allow)."""

    async def reload(self) -> None:
        rows = await self._backend_registry.rows()
        refused = frozenset(r.url for r in rows if r.added and not self._allow.allows_url(r.url))
        for url in sorted(refused - self.refused):
            log.warning("backend registry: %s refused: its host is not in backends.allow", url)
        self.refused = refused
        changes = apply_registry(self._backends, [r for r in rows if r.url not in refused])
        for change in changes:
            log.info("backend registry: %s", change)

    def nudge(self, _payload: str) -> None:
        """A notification: reload soon (coalesced: one reload at a time, one more after)."""
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._reload_soon())

    async def _reload_soon(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self.reload()
                except DB_ERRORS as exc:  # the next (re)connect resyncs anyway
                    self._warn.warning("registry", "cannot read the backend registry: %r", exc)
                if not self._again:
                    return
        finally:
            self._task = None

    async def stop(self) -> None:
        await stop_all(self._task)
