"""The simulator's Prometheus metrics, under vLLM's own names."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from affinity_node.sim.capacity import Engine

TTFT_BUCKETS: Final = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""vLLM's TTFT buckets from 5 ms up: the fake's timings start at a few milliseconds."""


class BackendMetrics:
    """vLLM's metric names, in a registry of this backend's own (several share a process).

    The load gauges (running, waiting, KV usage) are read from the engine at scrape time,
    so a scrape always sees the state of that moment, as vLLM's own /metrics does.
    """

    def __init__(self, models: Sequence[str], engine: Engine) -> None:
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.queries = Counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            labels,
            registry=self.metrics_registry,
        )
        self.hits = Counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            labels,
            registry=self.metrics_registry,
        )
        self.running = Gauge(
            "vllm:num_requests_running",
            "Requests holding a running slot (prefilling or decoding).",
            labels,
            registry=self.metrics_registry,
        )
        self.waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests queued for a slot (FIFO).",
            labels,
            registry=self.metrics_registry,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage: blocks held by running requests over the cache, 0..1.",
            labels,
            registry=self.metrics_registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.metrics_registry,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited for a running slot.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.metrics_registry,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Time from arrival to the last output token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.metrics_registry,
        )
        for model in models:  # every series exists from the first scrape
            for metric in (self.queries, self.hits, self.ttft, self.queue_time, self.e2e):
                metric.labels(model_name=model)
            self.running.labels(model_name=model).set_function(
                functools.partial(engine.running_with, model)
            )
            self.waiting.labels(model_name=model).set_function(
                functools.partial(engine.waiting_with, model)
            )
            # One KV pool per server, as in vLLM: every model's series shows the same value.
            self.kv_usage.labels(model_name=model).set_function(lambda: engine.kv_usage)
