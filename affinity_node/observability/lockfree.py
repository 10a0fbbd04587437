"""Counters and histograms for the per-request path without a lock: plain numbers, turned
into Prometheus metric families when scraped.

prometheus-client's Counter and Histogram take a mutex on every `inc()`/`observe()` (they are
thread-safe); the node updates a few of them per request on one event loop thread and scrapes
on that same thread, so the lock buys nothing and costs a measurable share of a cache hit.
Names, label sets, buckets and exemplars are exposed as prometheus-client exposes its own, so
dashboards see no difference.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import INF, floatToGoString


class FastCounterChild:
    __slots__ = ("_key", "_values")

    def __init__(self, values: dict[tuple[str, ...], float], key: tuple[str, ...]) -> None:
        self._values = values
        self._key = key
        values.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._key] += amount


class FastCounter(Collector):
    """`labels(...).inc()` like prometheus_client.Counter; one event loop thread only."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._children: dict[tuple[str, ...], FastCounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> FastCounterChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = FastCounterChild(self._values, values)
        return child

    def label_sets(self) -> list[tuple[str, ...]]:
        return list(self._values)

    def remove(self, *values: str) -> None:
        """Drops one series, as prometheus_client's `remove` does. Its child must not be used
        after this (its `inc` would raise KeyError): holders drop it first."""
        self._children.pop(values, None)
        self._values.pop(values, None)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value)
        yield family


class FastHistogramChild:
    """One label set: a count per bucket (not cumulative), the sum, each bucket's latest
    exemplar."""

    __slots__ = ("_bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * len(bounds)

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        i = bisect_left(self._bounds, value)  # le is inclusive: `value <= bound`
        self.counts[i] += 1
        self.sum += value
        if exemplar is not None:
            self.exemplars[i] = Exemplar(exemplar, value, time.time())


class FastHistogram(Collector):
    """`labels(...).observe(v, exemplar)` like prometheus_client.Histogram (and `observe`
    directly without labels); one event loop thread only."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._children: dict[tuple[str, ...], FastHistogramChild] = {}
        self._unlabelled: FastHistogramChild | None = None
        if not self._labelnames:
            self._unlabelled = self._children[()] = FastHistogramChild(self._bounds)
        registry.register(self)

    def labels(self, *values: str) -> FastHistogramChild:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = FastHistogramChild(self._bounds)
        return child

    def observe(self, value: float, exemplar: dict[str, str] | None = None) -> None:
        child = self._unlabelled
        if child is None:
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got ()")
        child.observe(value, exemplar)

    def label_sets(self) -> list[tuple[str, ...]]:
        return list(self._children)

    def remove(self, *values: str) -> None:
        """Drops one series, as prometheus_client's `remove` does."""
        self._children.pop(values, None)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        names = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        for labels, child in list(self._children.items()):
            cumulative = 0
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for name, count, exemplar in zip(names, child.counts, child.exemplars, strict=True):
                cumulative += count
                if exemplar is None:
                    buckets.append((name, cumulative))
                else:
                    buckets.append((name, cumulative, exemplar))
            family.add_metric(labels, buckets, child.sum)
        yield family
