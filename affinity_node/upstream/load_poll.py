"""Reads each engine's own /metrics: running and waiting requests, KV cache usage.

vLLM exports all three. llama.cpp (started with `--metrics`) exports the requests its slots
are processing and the ones deferred until a slot frees (its queue); recent builds export no
KV gauge (older ones had `llamacpp:kv_cache_usage_ratio`, read when present), so its kv stays
None. Only the few lines needed are looked at. Samples of one metric are summed over their
label sets (vLLM labels them by model and engine; data-parallel engines each report their
own); KV usage takes the highest engine. A backend that does not answer or exports none of
these is judged by the node's own in-flight count until it does (routing/load_view.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from affinity_node.routing.backends import BackendPool
from affinity_node.routing.load_view import LoadView
from affinity_node.tasks import Periodic, every
from affinity_node.upstream.client import UpstreamClient
from affinity_node.vocabulary import CACHE_KINDS

log = logging.getLogger(__name__)

RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
KV_USAGE = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",  # vLLM's older name
    "llamacpp:kv_cache_usage_ratio",  # llama.cpp before 2025
)
_PREFIXES = ("vllm:", "llamacpp:")


def parse_load(text: str) -> tuple[float | None, float | None, float | None]:
    """(running, waiting, kv usage) from Prometheus text; None for what is not there."""
    running: float | None = None
    waiting: float | None = None
    kv: float | None = None
    for line in text.splitlines():
        if not line.startswith(_PREFIXES):
            continue
        brace = line.find("{")
        if brace >= 0:  # name{labels} value [timestamp]; label values may hold spaces
            name, tail = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, _, tail = line.partition(" ")
        fields = tail.split()
        try:
            value = float(fields[0])
        except (ValueError, IndexError):
            continue
        if name in RUNNING:
            running = (running or 0.0) + value
        elif name in WAITING:
            waiting = (waiting or 0.0) + value
        elif name in KV_USAGE:
            kv = value if kv is None else max(kv, value)
    return running, waiting, kv


class LoadPoller:
    def __init__(
        self,
        backends: BackendPool,
        view: LoadView,
        client: UpstreamClient,
        interval_s: float,
        on_round: Callable[[], None] = lambda: None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"load poll interval must be positive, not {interval_s}")
        self._backends = backends
        self._view = view
        self._client = client
        self._interval = interval_s
        self._on_round = on_round

    async def poll_once(self) -> None:
        backends = [b for b in self._backends.backends if b.kind in CACHE_KINDS and b.healthy]
        texts = await asyncio.gather(
            *(self._client.metrics_text(b.id, self._interval) for b in backends)
        )
        for backend, text in zip(backends, texts, strict=True):
            if text is None:
                self._view.record(backend, None, None, None)
            else:
                self._view.record(backend, *parse_load(text))
        self._view.classify()
        self._on_round()

    def start(self) -> Periodic:
        """A poll now, then one every interval, until stopped."""
        return every(self._interval, self.poll_once, "load-poll", now=True)
