"""Metrics computed when Prometheus scrapes, from state the node keeps anyway.

Nothing here runs per request: bindings per backend are read from the counts the engine's
cache keeps as it changes, and healthy backends per model from the backend pool, once per scrape.

The same pass creates the per-model and per-backend series of the request metrics at zero as
soon as a model or backend becomes known (configured, or learned from a backend's /v1/models),
so that dashboards and `rate()` have series from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from typing import Generic, Protocol, TypeVar

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.vocabulary import BACKEND_STATES, BackendState


class BackendView(Protocol):
    """What a scrape reads of one backend (routing/backends.Backend): observability sits
    below routing, so it names what it reads instead of importing it."""

    @property
    def id(self) -> str: ...

    @property
    def models(self) -> Set[str]: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def inflight(self) -> int: ...

    @property
    def state(self) -> BackendState: ...

    @property
    def running(self) -> float | None: ...

    @property
    def waiting(self) -> float | None: ...

    @property
    def kv_usage(self) -> float | None: ...


B = TypeVar("B", bound=BackendView)


class PoolView(Protocol[B]):
    """What a scrape reads of the backend pool (routing/backends.BackendPool)."""

    @property
    def backends(self) -> Sequence[B]: ...

    def candidates(self, model: str) -> Sequence[B]: ...

    def affinity_applies(self, model: str, backend: B) -> bool: ...


class CacheView(Protocol):
    """What a scrape reads of the binding cache (routing/cache.BindingCache)."""

    def bindings_per_backend(self) -> Mapping[str, int]: ...

    def set_sizes(self) -> Mapping[int, int]: ...


OTHER_BACKEND = "other"
"""Label for cached bindings to a backend this node does not know (bounded labels)."""

_BINDINGS = (
    "affinity_cache_bindings",
    "Bindings in this node's cache, by backend (every node caches the same table).",
)
_HEALTHY = (
    "affinity_model_healthy_backends",
    "Backends in rotation on this node for each canonical model.",
)
_LOAD = (
    "affinity_backend_load",
    "Each vLLM backend's own load as last polled (every node's traffic): running and waiting "
    "requests, KV cache usage (0..1).",
)
_INFLIGHT = ("affinity_upstream_inflight", "Requests in flight to each backend (streams included).")
_HEALTHY_BACKEND = ("affinity_backend_healthy", "1 while the backend is in rotation.")
_STATE = (
    "affinity_backend_state",
    "1 for each backend's admin state (active, draining, disabled), 0 for the others.",
)
_FANOUT_PAIRS = (
    "affinity_fanout_pairs",
    "Cached pairs by the size of their backend set (1: one backend).",
)
MAX_SET_SIZE = 16


class NodeCollector(Collector, Generic[B]):
    def __init__(
        self,
        backends: PoolView[B],
        cache: CacheView,
        affinity: AffinityMetrics,
        http: HttpMetrics,
        models: Iterable[str] = (),
    ) -> None:
        """`models` are the configured canonical names (a model whose backends are all down is
        still listed)."""
        self._backends = backends
        self._cache = cache
        self._affinity = affinity
        self._http = http
        self._models = tuple(models)
        self._known: tuple[frozenset[str], frozenset[str]] | None = None
        self._init_series()

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*_BINDINGS, labels=["backend"])
        yield GaugeMetricFamily(*_HEALTHY, labels=["model"])
        yield GaugeMetricFamily(*_LOAD, labels=["backend", "kind"])
        yield GaugeMetricFamily(*_INFLIGHT, labels=["backend"])
        yield GaugeMetricFamily(*_HEALTHY_BACKEND, labels=["backend"])
        yield GaugeMetricFamily(*_STATE, labels=["backend", "state"])
        yield GaugeMetricFamily(*_FANOUT_PAIRS, labels=["size"])

    def collect(self) -> Iterator[Metric]:
        self._init_series()
        counts = dict.fromkeys((b.id for b in self._backends.backends), 0)
        for backend, n in self._cache.bindings_per_backend().items():
            key = backend if backend in counts else OTHER_BACKEND
            counts[key] = counts.get(key, 0) + n
        bindings = GaugeMetricFamily(*_BINDINGS, labels=["backend"])
        for backend, n in counts.items():
            bindings.add_metric([backend], n)
        yield bindings

        healthy = GaugeMetricFamily(*_HEALTHY, labels=["model"])
        for model in sorted(self._all_models()):
            healthy.add_metric([model], len(self._backends.candidates(model)))
        yield healthy

        inflight = GaugeMetricFamily(*_INFLIGHT, labels=["backend"])
        up = GaugeMetricFamily(*_HEALTHY_BACKEND, labels=["backend"])
        state = GaugeMetricFamily(*_STATE, labels=["backend", "state"])
        for b in self._backends.backends:
            inflight.add_metric([b.id], b.inflight)
            up.add_metric([b.id], 1 if b.healthy else 0)
            for name in BACKEND_STATES:
                state.add_metric([b.id, name], 1 if b.state == name else 0)
        yield inflight
        yield up
        yield state

        load = GaugeMetricFamily(*_LOAD, labels=["backend", "kind"])
        for polled in self._backends.backends:
            for kind, value in (("running", polled.running), ("waiting", polled.waiting),
                                ("kv_usage", polled.kv_usage)):  # fmt: skip
                if value is not None:
                    load.add_metric([polled.id, kind], value)
        yield load

        sizes = self._cache.set_sizes()
        pairs = GaugeMetricFamily(*_FANOUT_PAIRS, labels=["size"])
        for size in range(1, max(4, *sizes) + 1):  # sizes 1-4 always, so panels have series
            pairs.add_metric([str(size)], sizes.get(size, 0))
        yield pairs

    def _all_models(self) -> set[str]:
        models = set(self._models)
        for backend in self._backends.backends:
            models.update(backend.models)
        return models

    def _init_series(self) -> None:
        ids = frozenset(b.id for b in self._backends.backends)
        affinity_models = frozenset(
            m
            for b in self._backends.backends
            for m in b.models
            if self._backends.affinity_applies(m, b)
        )
        known = (ids, affinity_models)
        if known == self._known:
            return
        self._known = known
        self._affinity.init_models(sorted(affinity_models))
        self._http.init_backends(sorted(ids))


_QUEUE = (
    "affinity_notify_queue_usage",
    "Postgres's NOTIFY queue fill (0-1), as last read; absent while Postgres does not answer. "
    "Full: every notifying commit of the fleet fails.",
)
_REFUSED = (
    "affinity_backends_refused",
    "Registry backends this node refuses: their host is not in backends.allow.",
)


class OperatorCollector(Collector):
    """The database-wide signals an operator alerts on, from values the node's background
    tasks last read (a scrape never waits on Postgres)."""

    def __init__(self, queue_usage: Callable[[], float | None], refused: Callable[[], int]) -> None:
        self._queue_usage = queue_usage
        self._refused = refused

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(*_QUEUE)
        yield GaugeMetricFamily(*_REFUSED)

    def collect(self) -> Iterator[Metric]:
        usage = self._queue_usage()
        queue = GaugeMetricFamily(*_QUEUE)
        if usage is not None:
            queue.add_metric([], usage)
        yield queue
        yield GaugeMetricFamily(*_REFUSED, value=self._refused())
