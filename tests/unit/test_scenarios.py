"""The demo's scenarios: the capacity the skew scenario derives its rate from, and presets
that set up what issue #11 describes."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from affinity_node.sim.capacity import CapacityModel
from affinity_node.sim.demo import configure_parser, invalid, resolve
from affinity_node.sim.scenarios import (
    CHAT,
    PRESETS,
    SKEW,
    backend_capacity_rps,
    backends_of_load,
    sticky_uncached_tokens,
)
from affinity_node.sim.workload import WorkloadConfig


def config(**kw: Any) -> WorkloadConfig:
    base: dict[str, Any] = dict(base_urls=("http://unused",), api_keys=("k",), rate=10.0)
    base.update(kw)
    return WorkloadConfig(**base)


# -- the capacity the skew scenario's rate comes from -----------------------------------------


def test_sticky_uncached_tokens_counts_question_answer_and_half_a_block():
    cfg = config(user_tokens=(20, 40), max_tokens=30, max_turns=3)
    question, answer = 30 + 2, 30 + 2
    expected = ((question + 8) + 2 * (question + answer + 8)) / 3
    assert sticky_uncached_tokens(cfg) == pytest.approx(expected)


def test_capacity_is_the_tighter_of_prefill_and_slots():
    cfg = config(user_tokens=(20, 40), max_tokens=30, max_turns=1)  # 40 uncached tokens
    prefill_bound = CapacityModel(prefill_s_per_token=0.001, max_running=64)
    assert backend_capacity_rps(prefill_bound, cfg) == pytest.approx(1 / 0.040)
    # One slot held for prefill, first token and 29 decode steps: slots bind first.
    slot_bound = CapacityModel(
        prefill_s_per_token=0.001, max_running=1, ttft_base_s=0.01, decode_tokens_per_s=100.0
    )
    assert backend_capacity_rps(slot_bound, cfg) == pytest.approx(1 / (0.040 + 0.01 + 0.29))
    assert backends_of_load(0.5, 40.0, 10.0) == pytest.approx(2.0)


def test_the_skew_preset_is_the_issues_setup():
    """Top tenant 1.5-2 backends of load at ~65% of a 4-backend fleet; prefill-bound."""
    p = SKEW
    cfg = config(
        tenants=p.keys,
        conversations_per_tenant=p.conversations,
        max_turns=p.max_turns,
        system_tokens=p.system_tokens,
        user_tokens=p.user_tokens,
        max_tokens=p.output_tokens,
        zipf_exponent=p.zipf,
    )
    model = p.backend.capacity(cache_blocks=1000)
    capacity = backend_capacity_rps(model, cfg)
    assert capacity == pytest.approx(1 / model.prefill_s(round(sticky_uncached_tokens(cfg))))
    rate = p.load * 4 * capacity
    assert 1.5 <= backends_of_load(cfg.popularity()[0], rate, capacity) <= 2.0
    assert p.rate is None and p.warmup_s > 0 and p.columns[1].affinity["max_fanout"] == 1
    assert [c.affinity.get("max_fanout") for c in p.columns] == [None, 1, 4]
    assert not p.columns[0].affinity["enabled"]
    # chat stays today's default: three columns, the last one shared affinity.
    assert [c.key for c in CHAT.columns] == ["off", "node_local", "shared"]
    assert set(PRESETS) == {"chat", "skew", "scale", "agents", "db-failover", "noisy"}


def test_llamacpp_engines_run_chat_and_skew_at_their_own_lighter_defaults():
    parser = argparse.ArgumentParser()
    configure_parser(parser)

    def args(*extra: str) -> argparse.Namespace:
        return parser.parse_args(["--engine", "llamacpp", *extra])

    assert invalid(args("--scenario", "skew")) is None
    skew = resolve(args("--scenario", "skew"))
    assert (skew.rate, skew.zipf, skew.keys, skew.warmup) == (4.0, SKEW.zipf, 8, 10.0)
    assert resolve(args("--scenario", "skew", "--rate", "3")).rate == 3.0
    assert resolve(args()).rate == 4.0  # chat keeps its own
    refused = invalid(args("--scenario", "agents"))
    assert refused is not None and "chat and skew" in refused
