"""Reading the load gauges out of a vLLM /metrics page (no server: the text only)."""

from __future__ import annotations

from affinity_node.sim.sampler import KV_USAGE, RUNNING, WAITING, read_gauges

PAGE = """\
# HELP vllm:num_requests_running Requests holding a running slot (prefilling or decoding).
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m1"} 16.0
vllm:num_requests_running{model_name="m2"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m1"} 31.0
vllm:num_requests_waiting{model_name="m2"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc 0.42
vllm:num_requests_waiting_other{model_name="m1"} 99.0
vllm:time_to_first_token_seconds_bucket{le="0.005",model_name="m1"} 3.0
vllm:num_requests_waiting{model_name="m3"} not-a-number
"""


def test_reads_and_sums_the_gauges_it_needs():
    gauges = read_gauges(PAGE)
    assert gauges == {RUNNING: 18.0, WAITING: 31.0, KV_USAGE: 0.42}


def test_an_empty_page_reads_as_nothing():
    assert read_gauges("") == {}
    assert read_gauges("# only comments\n") == {}


def test_llama_cpp_gauges_read_as_vllm_s():
    """llama.cpp's /metrics (recorded from a server with two slots and three requests)."""
    page = (
        "# TYPE llamacpp:requests_processing gauge\n"
        "llamacpp:requests_processing 2\n"
        "llamacpp:requests_deferred 1\n"
        "llamacpp:n_busy_slots_per_decode 1.94577\n"
    )
    assert read_gauges(page) == {RUNNING: 2.0, WAITING: 1.0}
