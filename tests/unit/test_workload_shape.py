"""The skew workload's shape without a server: Zipf popularity, conversations by popularity,
new end users when a hot tenant is busy, open-loop arrivals over a warm-up and the measured
part."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest

from affinity_node.sim.workload import Workload, WorkloadConfig, arrival_times, zipf_weights


def config(**kw: Any) -> WorkloadConfig:
    base: dict[str, Any] = dict(
        base_urls=("http://unused",),
        api_keys=("k",),
        tenants=8,
        conversations_per_tenant=8,
        rate=10.0,
        seed=3,
    )
    base.update(kw)
    return WorkloadConfig(**base)


def test_zipf_weights():
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0) and w[0] / w[3] == pytest.approx(4.0)
    assert zipf_weights(5, 0.0) == pytest.approx([0.2] * 5)
    # The skew default: the top tenant draws about two thirds of the arrivals.
    assert zipf_weights(8, 2.0)[0] == pytest.approx(0.6547, abs=1e-3)


def test_conversations_follow_popularity_and_every_tenant_has_one():
    cfg = config(zipf_exponent=2.0)
    counts = cfg.conversation_counts()
    assert counts == [42, 10, 5, 3, 2, 1, 1, 1]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 1
    assert config().conversation_counts() == [8] * 8  # uniform: as before
    built = Workload(cfg).conversations
    assert Counter(c.tenant for c in built) == dict(enumerate(counts))
    # Conversations of one tenant share its system prompt; tenants never share one.
    assert len({c.system for c in built}) == 8
    assert all(c.system == built[0].system for c in built if c.tenant == 0)


def test_picks_follow_the_zipf_law():
    cfg = config(zipf_exponent=1.5)
    workload = Workload(cfg)
    n = 20_000
    seen = Counter(conv.tenant for conv in (workload.pick() for _ in range(n)) if conv is not None)
    for tenant, share in enumerate(cfg.popularity()):
        expected = n * share
        assert abs(seen[tenant] - expected) < 5 * math.sqrt(expected) + 5, (tenant, seen)


def test_a_busy_zipf_tenant_opens_a_new_conversation_instead_of_lending_its_load():
    cfg = config(tenants=2, conversations_per_tenant=1, zipf_exponent=10.0)
    workload = Workload(cfg)
    opened = []
    for _ in range(5):
        conv = workload.pick()
        assert conv is not None and conv.tenant == 0  # tenant 1 draws ~0.1% of arrivals
        conv.busy = True  # in flight
        opened.append(conv)
    assert len({c.name for c in opened}) == 5
    assert workload.stats.opened == 5 - cfg.conversation_counts()[0]
    assert all(c.system == opened[0].system for c in opened)


def test_uniform_tenants_still_lend_an_idle_conversation():
    cfg = config(tenants=2, conversations_per_tenant=1)
    workload = Workload(cfg)
    a = workload.pick()
    assert a is not None
    a.busy = True
    b = workload.pick()
    assert b is not None and b is not a  # whichever tenant was drawn: the idle one
    b.busy = True
    assert workload.pick() is None and workload.stats.opened == 0


def test_open_loop_arrivals_span_the_warmup_and_the_measured_part():
    rate, warmup, duration = 40.0, 10.0, 20.0
    times = arrival_times(rate, warmup + duration, 10**6, seed=1)
    assert abs(len(times) - rate * 30) < 4 * math.sqrt(rate * 30)
    measured = [t for t in times if t >= warmup]
    assert abs(len(measured) - rate * duration) < 4 * math.sqrt(rate * duration)


@pytest.mark.parametrize("bad", [{"zipf_exponent": -1.0}, {"warmup_s": -1.0}])
def test_config_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        config(**bad)
