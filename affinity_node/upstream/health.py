"""Active health checks and model discovery: asks every backend, tells routing/health.py."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.routing.health import BackendHealth
from affinity_node.tasks import Periodic, every
from affinity_node.upstream.client import UpstreamError

log = logging.getLogger(__name__)


class Prober(Protocol):
    """What the checker needs from the HTTP client (UpstreamClient provides it)."""

    async def health(self, base_url: str) -> str | None: ...

    async def models(self, base_url: str) -> list[str]: ...


class HealthChecker:
    def __init__(
        self, pool: BackendPool, health: BackendHealth, prober: Prober, interval_s: float
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"health interval must be positive, not {interval_s}")
        self._pool = pool
        self._health = health
        self._prober = prober
        self._interval = interval_s

    async def check_once(self) -> None:
        """One round of probes on every backend, concurrently; then due discoveries."""
        backends = self._pool.backends
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
        """Learn the models of backends configured without any; failures retry next round."""
        pending = [b for b in self._pool.backends if b.discovers and not b.models]
        if pending:
            await asyncio.gather(*(self._discover_one(b) for b in pending))

    async def _discover_one(self, backend: Backend) -> bool:
        """Replace the backend's models with what /v1/models lists; keep them on failure."""
        try:
            ids = await self._prober.models(backend.id)
        except UpstreamError as exc:
            backend.last_error = f"/v1/models: {exc}"
            log.warning("backend %s: model discovery failed: %s", backend.id, exc)
            return False
        if self._pool.set_models(backend, ids):
            log.info(
                "backend %s serves %s", backend.id, ", ".join(sorted(backend.models)) or "nothing"
            )
        return True

    def start(self) -> Periodic:
        """A round now, then one every interval, until stopped."""
        return every(self._interval, self.check_once, "health-checks", now=True)
