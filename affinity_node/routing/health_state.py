"""The health state machine of every backend: when to eject, when to re-admit.

Two kinds of evidence arrive. Probe results (upstream/probes.py asks GET /health every
interval) eject a backend after N consecutive failures and re-admit it after M consecutive
successes; request reports from the proxy (connection errors, 5xx) eject it after N consecutive
failures without waiting for the next round. Re-admission is only ever decided by probes, so a
backend that answers /health but fails requests flaps at the check interval, not at request
rate. A backend that fails its very first probe is ejected at once: the optimistic start should
not cost N rounds of failed requests against a server that was never up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from affinity_node.routing.backends import Backend, BackendPool

log = logging.getLogger(__name__)

HealthCallback = Callable[[str, bool], None]
"""Called as (backend_id, healthy) on every health transition; for metrics, not control."""


class BackendHealth:
    def __init__(
        self,
        backends: BackendPool,
        *,
        eject_after_failures: int = 3,
        readmit_after_successes: int = 2,
        on_change: HealthCallback | None = None,
    ) -> None:
        if eject_after_failures < 1:
            raise ValueError(f"eject_after_failures must be >= 1, not {eject_after_failures}")
        if readmit_after_successes < 1:
            raise ValueError(f"readmit_after_successes must be >= 1, not {readmit_after_successes}")
        self._backends = backends
        self._eject_after = eject_after_failures
        self._readmit_after = readmit_after_successes
        self.on_change = on_change

    # -- request reports ---------------------------------------------------------------------

    def request_succeeded(self, backend: Backend) -> None:
        """Breaks a run of failures. Does not re-admit (probes do)."""
        backend.consecutive_failures = 0

    def request_failed(self, backend: Backend, reason: str) -> None:
        """A request failed at the backend (connection error, 5xx; the caller decides).

        Ejects at once on the N-th consecutive failure instead of waiting for a probe round.
        """
        self._failed(backend, reason, first_probe=False)

    # -- probe results -----------------------------------------------------------------------

    def probe_succeeded(self, backend: Backend) -> bool:
        """Returns True when this success re-admitted the backend."""
        backend.probed = True
        backend.consecutive_failures = 0
        backend.consecutive_successes += 1
        backend.last_error = None
        if not backend.healthy and backend.consecutive_successes >= self._readmit_after:
            self._set(backend, True, "health checks pass")
            return True
        return False

    def probe_failed(self, backend: Backend, reason: str) -> None:
        first = not backend.probed
        backend.probed = True
        self._failed(backend, reason, first_probe=first)

    # -- transitions -------------------------------------------------------------------------

    def _failed(self, backend: Backend, reason: str, *, first_probe: bool) -> None:
        backend.consecutive_successes = 0
        backend.consecutive_failures += 1
        backend.last_error = reason
        if backend.healthy and (first_probe or backend.consecutive_failures >= self._eject_after):
            self._set(backend, False, reason)

    def _set(self, backend: Backend, healthy: bool, reason: str) -> None:
        backend.healthy = healthy
        backend.consecutive_successes = 0
        self._backends.invalidate()
        if healthy:
            log.warning("backend %s re-admitted: %s", backend.id, reason)
        else:
            log.warning("backend %s ejected: %s", backend.id, reason)
        callback = self.on_change
        if callback is not None:
            try:
                callback(backend.id, healthy)
            except Exception:
                log.exception("health callback failed for %s", backend.id)
