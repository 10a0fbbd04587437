"""Active health checks and model discovery: asks every backend, tells routing/health_state.py.

Discovery asks each discovering backend's GET /v1/models at start (those that serve nothing
until then), on re-admission, and every discovery interval (jittered, concurrently, in the
background: never on the request path), so LoRA adapters loaded or unloaded at runtime join
or leave the backend's models. A failed discovery keeps what was known.
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.routing.health_state import BackendHealth
from affinity_node.tasks import Periodic, every
from affinity_node.upstream.client import UpstreamError
from affinity_node.upstream.ports import Prober

log = logging.getLogger(__name__)

JITTER = 0.2
"""Discovery rounds are spread by +-20% so the nodes of a fleet do not ask in step."""


class HealthChecker:
    def __init__(
        self, backends: BackendPool, health: BackendHealth, prober: Prober, interval_s: float
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"health interval must be positive, not {interval_s}")
        self._backends = backends
        self._health = health
        self._prober = prober
        self._interval = interval_s
        self._tickets = itertools.count(1)
        self._applied: dict[str, int] = {}
        """Backend id -> ticket of the latest-started discovery applied: an older answer
        arriving after a newer one (health re-admission racing the periodic round) is dropped."""
        self._warn = RateLimitedLog(log, interval=60.0)
        """Discovery failures: one line per backend a minute, not one per round."""

    async def check_once(self) -> None:
        """One round of probes on every backend, concurrently; then due discoveries."""
        backends = self._backends.backends
        results = await asyncio.gather(*(self._prober.health(b.id) for b in backends))
        to_discover: list[Backend] = []
        for backend, error in zip(backends, results, strict=True):
            if error is None:
                readmitted = self._health.probe_succeeded(backend)
                # A re-admitted server may have restarted with other models: ask again.
                if backend.discovers and backend.healthy and (readmitted or not backend.models):
                    to_discover.append(backend)
            else:
                self._health.probe_failed(backend, error)
        if to_discover:
            await asyncio.gather(*(self._discover_one(b) for b in to_discover))

    async def discover(self) -> None:
        """Learn the models of backends that serve nothing yet; failures retry next round."""
        pending = [b for b in self._backends.backends if b.discovers and not b.models]
        if pending:
            await asyncio.gather(*(self._discover_one(b) for b in pending))

    async def discover_all(self) -> None:
        """One discovery round: every discovering backend that is healthy, concurrently
        (each bounded by the client's discovery timeout)."""
        backends = self._backends.backends
        for gone in self._applied.keys() - {b.id for b in backends}:
            del self._applied[gone]
        due = [b for b in backends if b.discovers and b.healthy]
        if due:
            await asyncio.gather(*(self._discover_one(b) for b in due))

    async def _discover_one(self, backend: Backend) -> bool:
        """Replace the backend's discovered models with what /v1/models lists; keep them on
        failure."""
        ticket = next(self._tickets)
        try:
            listed = await self._prober.models(backend.id)
        except UpstreamError as exc:
            backend.last_error = f"/v1/models: {exc}"
            self._warn.warning(
                backend.id, "backend %s: model discovery failed: %s", backend.id, exc
            )
            return False
        if (
            ticket < self._applied.get(backend.id, 0)
            or self._backends.get(backend.id) is not backend
        ):
            return False  # a newer answer is in, or the backend left meanwhile
        self._applied[backend.id] = ticket
        if self._backends.set_models(backend, listed):
            log.info(
                "backend %s serves %s", backend.id, ", ".join(sorted(backend.models)) or "nothing"
            )
        return True

    def start_discovery(self, interval_s: float) -> Periodic:
        """A discovery round now, then one every `interval_s` (jittered), until stopped."""
        if interval_s <= 0:
            raise ValueError(f"discovery interval must be positive, not {interval_s}")
        return every(interval_s, self.discover_all, "model-discovery", jitter=JITTER, now=True)

    def start(self) -> Periodic:
        """A round now, then one every interval, until stopped."""
        return every(self._interval, self.check_once, "health-checks", now=True)
