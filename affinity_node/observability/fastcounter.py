"""Counters for the per-request path without a lock: plain integers in a dict, turned into a
Prometheus counter family when scraped.

prometheus-client's Counter takes a mutex on every `inc()` (it is thread-safe); the node
increments a few counters per request on one event loop thread and scrapes on that same
thread, so the lock buys nothing and costs a measurable share of a cache hit. Label sets and
exposition are the same as a Counter's (`<name>_total`), so dashboards see no difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


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

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value)
        yield family
