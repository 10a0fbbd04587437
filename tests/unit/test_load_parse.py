"""The load poller's reading of an engine's /metrics page (text only, no server): vLLM's gauges
and llama.cpp's, into the same (running, waiting, kv usage)."""

from __future__ import annotations

from affinity_node.upstream.load_poll import parse_load

VLLM = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
"""

LLAMACPP = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 50
llamacpp:prompt_tokens_cached_total 48
llamacpp:n_tokens_max 52
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
llamacpp:n_busy_slots_per_decode 1.94577
"""
"""Recorded from llama.cpp's server (xllamacpp 2026.10) with two slots and three requests."""


def test_vllm_gauges_are_summed_over_engines_and_kv_takes_the_highest() -> None:
    assert parse_load(VLLM) == (5.0, 4.0, 0.5)


def test_llama_cpp_s_busy_slots_and_deferred_requests_are_running_and_waiting() -> None:
    # No KV gauge in current builds: kv stays unknown rather than 0 (an empty cache).
    assert parse_load(LLAMACPP) == (2.0, 1.0, None)


def test_an_older_llama_cpp_s_kv_ratio_is_read() -> None:
    page = LLAMACPP + "llamacpp:kv_cache_usage_ratio 0.75\n"
    assert parse_load(page) == (2.0, 1.0, 0.75)


def test_a_page_without_load_gauges_reads_as_unknown() -> None:
    assert parse_load("llamacpp:prompt_tokens_total 5\n# only comments\n") == (None, None, None)
