"""This node's duties toward the fleet, through the backend registry on Postgres: report what
it sees of each backend (for `backends list`, and so a drain knows when no node still runs
anything on a backend), and take its turn moving bindings (drain, rebalance).

Both run as periodic tasks (affinity_node/tasks.py); a database that does not answer is a
routine warning here (rate-limited), anything else is a bug and goes to the task's log."""

from __future__ import annotations

import logging
import time

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.routing.backends import BackendPool
from affinity_node.routing.lifecycle import Mover
from affinity_node.store.postgres import DB_ERRORS
from affinity_node.store.registry import PostgresRegistry

log = logging.getLogger(__name__)

MOVE_EVERY_S = 0.2
"""How often the mover looks for work (its pace is set by MoverRules and the fleet's slot)."""
REPORT_EVERY_S = 1.0
"""How often backend states are compared with the last report (a change is sent at once)."""


class HealthReporter:
    """What this node sees of each backend, written on change and every `full_every_s`."""

    def __init__(
        self,
        backend_registry: PostgresRegistry,
        backends: BackendPool,
        node_id: str,
        full_every_s: float = 15.0,
    ) -> None:
        self._backend_registry = backend_registry
        self._backends = backends
        self._node_id = node_id
        self._full_every = full_every_s
        self._seen: dict[str, tuple[bool, bool]] = {}
        """Backend -> (healthy, busy) as last reported: a drain ends when none is busy."""
        self._last_full = -float("inf")
        self._warn = RateLimitedLog(log)

    async def report_once(self) -> None:
        now = time.monotonic()
        due = now - self._last_full >= self._full_every
        seen = self._seen
        for backend in self._backends.backends:
            state = (backend.healthy, backend.inflight > 0)
            if due or seen.get(backend.id) != state:
                try:
                    await self._backend_registry.report_health(
                        self._node_id,
                        backend.id,
                        backend.healthy,
                        backend.kind,
                        backend.models,
                        backend.inflight,
                    )
                    seen[backend.id] = state
                except DB_ERRORS as exc:
                    self._warn.warning("health-report", "cannot report backend health: %r", exc)
                    break
        if due:
            self._last_full = now
            for gone in seen.keys() - {b.id for b in self._backends.backends}:
                del seen[gone]


class MoverTurns:
    """One mover tick per round; the database being away is a warning, not an error."""

    def __init__(self, mover: Mover) -> None:
        self._mover = mover
        self._warn = RateLimitedLog(log)

    async def tick(self) -> None:
        try:
            moved = await self._mover.tick()
        except DB_ERRORS as exc:
            self._warn.warning("mover", "binding mover: the database did not answer: %r", exc)
            return
        if moved is not None:
            log.info("moved a binding (%s)", moved)
