"""Per-backend state leaves with the backend (issue 21, defect 9), at the unit level."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from affinity_node.observability.metrics import HttpMetrics
from affinity_node.routing.backends import Backend, BackendPool, BackendSpec

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"


def backends_in(registry: CollectorRegistry) -> set[str]:
    return {
        s.labels["backend"]
        for family in registry.collect()
        for s in family.samples
        if "backend" in s.labels
    }


def test_forget_backend_removes_every_series_of_that_backend_only() -> None:
    registry = CollectorRegistry()
    m = HttpMetrics(registry, "test")
    m.init_backends([A, B])
    for backend in (A, B):
        m.count_upstream(backend, "200")
        m.count_upstream(backend, "error")
        m.observe_ttft(backend, 0.1, None)
    assert backends_in(registry) == {A, B}
    m.forget_backend(A)
    assert backends_in(registry) == {B}
    m.count_upstream(B, "200")  # the other's cached children still work
    assert (
        registry.get_sample_value("affinity_upstream_requests_total", {"backend": B, "code": "200"})
        == 2
    )
    m.count_upstream(A, "200")  # a late answer from the one that left counts from zero
    assert (
        registry.get_sample_value("affinity_upstream_requests_total", {"backend": A, "code": "200"})
        == 1
    )


def test_the_pool_tells_who_left() -> None:
    left: list[Backend] = []
    pool = BackendPool([BackendSpec(A, "vllm", ("m",))], on_remove=left.append)
    pool.add(BackendSpec(B, "vllm", ("m",)), "dns")
    assert pool.remove("http://10.0.0.9:8000") is None
    assert left == []
    pool.remove(B)
    assert [b.id for b in left] == [B]
