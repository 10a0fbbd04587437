"""The lock-free counter and histogram expose exactly what prometheus-client's own would for
the same updates (text format and OpenMetrics, exemplars included): dashboards and alerts
cannot tell them apart."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from affinity_node.observability.lockfree import FastCounter, FastHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
disable_created_metrics()  # as the node does (observability/metrics.py)


def exposition(registry: CollectorRegistry) -> tuple[str, str]:
    """Both formats, with exemplar timestamps (wall clock at observe time) taken out."""
    om = re.sub(r"(# \{[^}]*\} \S+) \d+(\.\d+)?", r"\1", openmetrics(registry).decode())
    return generate_latest(registry).decode(), om


@settings(max_examples=100, deadline=None)
@given(
    updates=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.5, 1.0, 3.0, 10.0, 11.0, 1e9]),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_the_histogram_exposes_what_prometheus_client_does(
    updates: list[tuple[str, float, bool]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("lat_seconds", "Latency.", ["route"], BUCKETS, ours)
    slow = Histogram("lat_seconds", "Latency.", ["route"], buckets=BUCKETS, registry=theirs)
    bare_fast = FastHistogram("bare_seconds", "No labels.", [], BUCKETS, ours)
    bare_slow = Histogram("bare_seconds", "No labels.", buckets=BUCKETS, registry=theirs)
    for route, value, with_exemplar in updates:
        ex = {"request_id": f"r-{value}"} if with_exemplar else None
        fast.labels(route).observe(value, ex)
        slow.labels(route).observe(value, ex)
        bare_fast.observe(value)
        bare_slow.observe(value)
    assert exposition(ours) == exposition(theirs)


@given(st.lists(st.tuples(st.sampled_from(["x", "y"]), st.integers(1, 5)), max_size=20))
def test_the_counter_exposes_what_prometheus_client_does(updates: list[tuple[str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastCounter("hits", "Hits.", ["kind"], ours)
    slow = Counter("hits", "Hits.", ["kind"], registry=theirs)
    for kind, amount in updates:
        fast.labels(kind).inc(amount)
        slow.labels(kind).inc(amount)
    assert exposition(ours) == exposition(theirs)


def test_a_labelled_histogram_observed_without_labels_is_refused_as_prometheus_client_does() -> (
    None
):
    fast = FastHistogram("lat_seconds", "Latency.", ["route"], BUCKETS, CollectorRegistry())
    slow = Histogram("lat_seconds", "Latency.", ["route"], buckets=BUCKETS, registry=None)
    for histogram in (fast, slow):
        with pytest.raises(ValueError):
            histogram.observe(1.0)
