"""The agents scenario's pieces without a server: a session's turns, the Zipf share-out, cache
sizing, which errors fail the demo, the chain-failure row and the preset's columns."""

from __future__ import annotations

import argparse
import random
from typing import Any

import pytest

from affinity_node.sim.agents import (
    AgentRecord,
    AgentsConfig,
    Session,
    build_sessions,
    chain_failures,
    live_context_blocks,
)
from affinity_node.sim.agents_demo import cache_blocks_for, kv_blocks_for, unexpected_errors
from affinity_node.sim.demo import configure_parser, invalid
from affinity_node.sim.render import render_table
from affinity_node.sim.report import build_report
from affinity_node.sim.responses_api import TOOL_TRIGGER
from affinity_node.sim.scenarios import AGENTS
from affinity_node.sim.workload import RequestRecord, WorkloadResult


def config(**kw: Any) -> AgentsConfig:
    base: dict[str, Any] = dict(base_urls=("http://unused",), api_keys=("sk-unit",))
    base.update(kw)
    return AgentsConfig(**base)


def message(text: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {"id": "msg_1", "type": "message", "role": "assistant", "content": [part]}


def call(call_id: str) -> dict[str, Any]:
    return {"id": "fc_1", "type": "function_call", "call_id": call_id, "name": "read_file"}


def test_a_turn_is_sent_again_until_answered_then_the_chain_grows():
    cfg = config(tool_share=0.0, turns_per_chain=3)
    s = Session(0, 0, "instructions", random.Random(1))
    first = s.next_input(cfg)
    assert s.next_input(cfg) is first  # a failed turn sends the same input again
    assert first[0]["role"] == "user" and TOOL_TRIGGER not in first[0]["content"]
    s.answered("resp_a", [message("one")], cfg)
    assert (s.previous_id, s.turns, s.name) == ("resp_a", 1, "t0/s0/c0")
    second = s.next_input(cfg)
    assert second is not first and second[0]["content"].startswith("Turn 2 ")
    s.answered("resp_b", [message("two")], cfg)
    assert s.history == [*first, message("one"), *second, message("two")]


def test_a_tool_call_is_answered_and_ends_its_chain_only_after_that():
    cfg = config(tool_share=1.0, turns_per_chain=1)
    s = Session(1, 2, "instructions", random.Random(1))
    asked = s.next_input(cfg)
    assert TOOL_TRIGGER in asked[0]["content"]
    s.answered("resp_a", [call("call_9")], cfg)
    # turns_per_chain reached, but the call is pending: the chain goes on.
    assert s.chain == 0 and s.previous_id == "resp_a"
    output = s.next_input(cfg)
    assert output[0]["type"] == "function_call_output" and output[0]["call_id"] == "call_9"
    s.answered("resp_b", [message("done")], cfg)
    assert (s.chain, s.turns, s.previous_id, s.history) == (1, 0, None, [])
    assert s.name == "t1/s2/c1"


def test_sessions_follow_zipf_and_share_their_tenants_instructions():
    cfg = config(tenants=4, sessions_per_tenant=5, zipf_exponent=1.5)
    assert cfg.session_counts() == [12, 4, 2, 1]
    assert config(tenants=3, sessions_per_tenant=2, zipf_exponent=0).session_counts() == [2] * 3
    sessions = build_sessions(cfg)
    assert len(sessions) == 19
    by_tenant: dict[int, set[str]] = {}
    for s in sessions:
        by_tenant.setdefault(s.tenant, set()).add(s.instructions)
    assert (
        all(len(v) == 1 for v in by_tenant.values())
        and len({next(iter(v)) for v in by_tenant.values()}) == 4
    )
    with pytest.raises(ValueError):
        config(tool_share=1.5)


def test_caches_hold_the_live_chains_over_the_fleet_and_kv_fits_the_slots():
    cfg = config(tenants=4, sessions_per_tenant=5, turns_per_chain=6)
    live = live_context_blocks(cfg)
    per_backend = cache_blocks_for(cfg, 4, 1.2)
    assert 4 * per_backend >= live > per_backend  # together yes, one backend alone no
    longest_blocks = (cfg.instructions_tokens[1] + 6 * cfg.tokens_per_turn()) / 16
    assert kv_blocks_for(cfg, AGENTS.backend) >= AGENTS.backend.max_running * longest_blocks


def _record(seq: int, error: str | None = None, chain_failure: bool = False) -> AgentRecord:
    return AgentRecord(
        seq, 0, "t0/s0/c0", 1, "m", 0, 0.0, status=404 if chain_failure else 200,
        error=error, chain_failure=chain_failure, backend_id="b0", ttft_s=0.01,
    )  # fmt: skip


def test_chain_failures_fail_the_demo_only_through_nodes():
    records: list[RequestRecord] = [
        _record(0),
        _record(1, "chain failure: HTTP 404", chain_failure=True),
        _record(2, "timeout after 60s"),
    ]
    result = WorkloadResult(records, 1.0, 0)
    assert chain_failures(records) == 1
    direct, shared = AGENTS.columns[0], AGENTS.columns[1]
    assert unexpected_errors(direct, result) == 1  # the timeout only
    assert unexpected_errors(shared, result) == 2  # through the nodes, a 404 is a failure too


def test_the_chain_failure_row_shows_only_for_the_agents_scenario():
    result = WorkloadResult([_record(0), _record(1, "404", chain_failure=True)], 1.0, 0)
    report = build_report("off", result)
    assert "chain failures" not in render_table([report])
    report.chain_failures = chain_failures(result.records)
    table = render_table([report])
    assert table.splitlines()[2].split() == ["chain", "failures", "(404s)", "1"]
    assert report.to_json()["chain_failures"] == 1


def test_the_agents_preset_compares_a_plain_lb_with_shared_affinity_and_fanout():
    off, shared, fanout = AGENTS.columns
    assert off.direct and not shared.direct and not fanout.direct
    assert shared.affinity["store"] == fanout.affinity["store"] == "postgres"
    assert (shared.affinity["max_fanout"], fanout.affinity["max_fanout"]) == (1, 4)
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert invalid(parser.parse_args(["--scenario", "agents"])) is None
    refused = invalid(parser.parse_args(["--scenario", "agents", "--rate", "5"]))
    assert refused is not None and "closed-loop" in refused
