"""Per request: which backend, and what affinity said about it.

Combines the backend pool (health, load), the fallback strategy, and the affinity engine. The
engine only ever sees vllm backends as candidates: external ones are never bound.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from affinity_node.observability.metrics import AffinityMetrics
from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.routing.engine import AffinityEngine, NoCandidates
from affinity_node.routing.strategies import Strategy
from affinity_node.vocabulary import HEADER_OF, AffinityHeader

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Route:
    backend: Backend
    affinity: AffinityHeader
    bound: Backend | None = None
    """The pair's bound backend when affinity decided (None for bypass and degraded)."""


class NoBackend(LookupError):
    """No healthy backend serves the model."""


@dataclass(frozen=True, slots=True)
class AffinityRules:
    enabled: bool = True
    load_factor: float = 1.25
    spill_min_gap: int = 8


class Router:
    def __init__(
        self,
        pool: BackendPool,
        strategy: Strategy,
        engine: AffinityEngine | None,
        rules: AffinityRules,
        metrics: AffinityMetrics,
    ) -> None:
        self._pool = pool
        self._strategy = strategy
        self._engine = engine if rules.enabled else None
        self._rules = rules
        self._m = metrics
        self._vllm: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def _choose_id(self, ids: Sequence[str]) -> str:
        """A backend for a new (or moved) binding: among those holding the fewest bindings,
        the fallback strategy decides.

        Bindings outlive any one request, so balancing their count balances the fleet's
        prefix caches and long-run load; in-flight counts alone tie at low load and scatter
        bindings unevenly (the demo saw 59 vs 276 requests on two backends).
        """
        backends = [b for b in map(self._pool.get, ids) if b is not None]
        engine = self._engine
        if engine is not None and len(backends) > 1:
            cache = engine.cache
            fewest = min(cache.bindings_of(b.id) for b in backends)
            backends = [b for b in backends if cache.bindings_of(b.id) == fewest]
        return self._strategy.choose(backends).id

    def _affinity_candidates(self, model: str) -> tuple[str, ...]:
        """The model's healthy vllm backends, recomputed only when the pool's list changes."""
        ids = self._pool.candidate_ids(model)
        cached = self._vllm.get(model)
        if cached is not None and cached[0] is ids:
            return cached[1]
        vllm: list[str] = []
        for i in ids:
            b = self._pool.get(i)
            if b is not None and self._pool.affinity_applies(model, b):
                vllm.append(i)
        result = tuple(vllm)
        self._vllm[model] = (ids, result)
        return result

    def fallback(self, model: str, exclude: Sequence[Backend] = ()) -> Backend | None:
        candidates = [b for b in self._pool.candidates(model) if b not in exclude]
        return self._strategy.choose(candidates) if candidates else None

    def retry_target(self, route: Route, model: str, tried: Sequence[Backend]) -> Backend | None:
        """Where to retry after `tried` failed: for a bound pair, a backend it could be bound
        to (vllm) when there is one, so that a failover can move the binding there."""
        if route.bound is not None:
            ids = self._affinity_candidates(model)
            eligible = [b for b in map(self._pool.get, ids) if b is not None and b not in tried]
            if eligible:
                return self._strategy.choose(eligible)
        return self.fallback(model, exclude=tried)

    def retry_header(self, route: Route, failed: Backend) -> AffinityHeader:
        """The header of a request retried elsewhere after `failed` failed: its binding moves
        only when the bound backend is unhealthy by now (one error is not enough, as the
        health thresholds say); otherwise the retry is a spill and the binding stays."""
        if route.bound is None or failed is not route.bound or route.affinity == "spill":
            return route.affinity
        return "spill" if failed.healthy else "rebind"

    def succeeded(
        self,
        route: Route,
        api_key_id: UUID,
        model: str,
        served_by: Backend,
        failed: Sequence[Backend],
    ) -> None:
        """After a success: extend the binding when its backend served, or move it to the
        backend that served when the bound one failed and is unhealthy now. A spill never
        touches it; nothing is ever bound to a backend affinity does not apply to."""
        engine = self._engine
        bound = route.bound
        if engine is None or bound is None or route.affinity == "spill":
            return
        if served_by is bound:
            engine.served(api_key_id, model, served_by.id)
        elif bound in failed:
            if bound.healthy or not self._pool.affinity_applies(model, served_by):
                self._m.spills.labels(model, "failover").inc()
            else:
                engine.failed_over(api_key_id, model, bound.id, served_by.id)

    async def route(self, api_key_id: UUID, model: str, affinity_path: bool) -> Route:
        """`model` is canonical; `affinity_path` is False for routes affinity never applies to."""
        engine = self._engine
        if engine is not None and affinity_path:
            ids = self._affinity_candidates(model)
            if ids:
                try:
                    res = await engine.resolve(api_key_id, model, ids, self._choose_id)
                except NoCandidates:
                    res = None
                if res is not None:
                    backend = self._pool.get(res.backend)
                    if backend is not None:
                        if res.outcome == "degraded":
                            return Route(backend, "degraded")
                        if res.outcome == "hit" and self._pool.overloaded(
                            backend, model, self._rules.load_factor, self._rules.spill_min_gap
                        ):
                            other = self.fallback(model, exclude=(backend,))
                            if other is not None:
                                self._m.spills.labels(model, "load").inc()
                                return Route(other, "spill", bound=backend)
                        return Route(backend, HEADER_OF[res.outcome], bound=backend)
        chosen = self.fallback(model)
        if chosen is None:
            raise NoBackend(model)
        return Route(chosen, "bypass")
