"""How busy each backend is, the same on every node.

Every node polls each vLLM backend's own /metrics (upstream/load_poll.py): running and waiting
requests count every node's traffic, so all nodes agree on which backend is hot without talking
to each other. Between polls a node adds its own in-flight changes for freshness. A backend
that exports no such metrics is judged by this node's in-flight count alone.

After each poll round the view classifies the backends of each model once: hot (a queue of its
own, or load well above the model's mean) and cool (no queue, load at most the mean). The
request path only tests set membership.
"""

from __future__ import annotations

from dataclasses import dataclass

from affinity_node.routing.backends import Backend, BackendPool
from affinity_node.vocabulary import CACHE_KINDS


@dataclass(frozen=True, slots=True)
class LoadRules:
    queue_bound: int = 4
    """Requests waiting in the backend's own queue that make it hot."""
    hot_factor: float = 1.5
    hot_min_gap: float = 4.0
    """Hot by load: above hot_factor x the mean and at least this much above it."""


class LoadView:
    def __init__(self, backends: BackendPool, rules: LoadRules | None = None) -> None:
        self._backends = backends
        self._rules = rules or LoadRules()
        self._hot: dict[str, frozenset[str]] = {}
        self._cool: dict[str, frozenset[str]] = {}
        self.polls = 0

    @staticmethod
    def load(backend: Backend) -> float:
        """Requests running and waiting on the backend now, as well as this node can tell."""
        if backend.running is None:
            return float(backend.inflight)
        own_since = backend.inflight - backend.inflight_at_poll
        return max(backend.running + (backend.waiting or 0.0) + own_since, 0.0)

    @staticmethod
    def record(
        backend: Backend, running: float | None, waiting: float | None, kv_usage: float | None
    ) -> None:
        """One poll's reading (None where the backend does not export it)."""
        backend.running, backend.waiting, backend.kv_usage = running, waiting, kv_usage
        backend.inflight_at_poll = backend.inflight

    def classify(self) -> None:
        """After a poll round: which backends of each model are hot, which are cool."""
        self.polls += 1
        rules = self._rules
        hot: dict[str, frozenset[str]] = {}
        cool: dict[str, frozenset[str]] = {}
        models = {m for b in self._backends.backends for m in b.models}
        for model in models:
            peers = [b for b in self._backends.candidates(model) if b.kind in CACHE_KINDS]
            if not peers:
                continue
            loads = {b.id: self.load(b) for b in peers}
            mean = sum(loads.values()) / len(loads)
            hot_load = max(rules.hot_factor * mean, mean + rules.hot_min_gap)
            hot[model] = frozenset(
                b.id
                for b in peers
                if (b.waiting or 0.0) >= rules.queue_bound or loads[b.id] > hot_load
            )
            cool[model] = frozenset(
                b.id for b in peers if not (b.waiting or 0.0) and loads[b.id] <= mean
            )
        self._hot, self._cool = hot, cool

    def hot(self, model: str) -> frozenset[str]:
        return self._hot.get(model, frozenset())

    def cool(self, model: str) -> frozenset[str]:
        return self._cool.get(model, frozenset())

    def least_loaded(self, model: str, exclude: frozenset[str] | set[str]) -> Backend | None:
        """The healthy cache-kind backend of `model` with the least load, outside `exclude`."""
        best: Backend | None = None
        best_load = 0.0
        for backend in self._backends.candidates(model):
            if (
                backend.kind not in CACHE_KINDS
                or backend.id in exclude
                or backend.state != "active"
            ):
                continue
            load = self.load(backend)
            if best is None or load < best_load:
                best, best_load = backend, load
        return best
