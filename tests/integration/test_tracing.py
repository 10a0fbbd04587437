"""Trace context through the node: a client's traceparent reaches vLLM through any node; with
tracing.otlp_endpoint set, spans reach a collector (a stand-in on loopback) and the access line
names the trace.

Real nodes and Postgres, fake vLLM backends, the openai SDK as the client.
"""

from __future__ import annotations

import json
import os

import aiohttp
import pytest

from affinity_node.config import NodeConfig
from affinity_node.sim.fake_backend import RunningFakeBackend
from tests.integration.test_ops import captured
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.otlp import OtlpReceiver
from tests.support.waiting import wait_for

MESSAGES = [{"role": "user", "content": "hello"}]


def served_by(c: Cluster, backend_id: str) -> RunningFakeBackend:
    return c.backends[int(backend_id[1:])]


def traceparent(flags: str = "01") -> tuple[str, str, str]:
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{parent}-{flags}", trace_id, parent


async def test_traceparent_reaches_the_backend_through_every_node(dsn):
    async with cluster(dsn, nodes=3, backends=2) as c:
        secret = await c.new_key("tracing")
        for node in range(3):
            client = c.client(node, secret)
            header, _, _ = traceparent()
            sent = {"traceparent": header, "tracestate": "vendor=abc,other=1"}
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, extra_headers=sent
            )
            got = served_by(c, raw.headers["x-backend-id"]).stats.last_headers
            assert (got.get("traceparent"), got.get("tracestate")) == (
                header,
                "vendor=abc,other=1",
            ), node
            header, _, _ = traceparent()  # streamed too
            async with client.chat.completions.with_streaming_response.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_headers={"traceparent": header}
            ) as response:
                async for _ in response.iter_lines():
                    pass
                got = served_by(c, response.headers["x-backend-id"]).stats.last_headers
            assert got.get("traceparent") == header and "tracestate" not in got, node


BAD_TRACEPARENTS = [
    "00-" + "A" * 32 + "-" + "1" * 16 + "-01",  # uppercase hex
    "00-" + "0" * 32 + "-" + "1" * 16 + "-01",  # all-zero trace id
    "00-" + "1" * 32 + "-" + "0" * 16 + "-01",  # all-zero parent id
    "ff-" + "1" * 32 + "-" + "1" * 16 + "-01",  # version ff
    "00-" + "1" * 32 + "-" + "1" * 16 + "-01-extra",  # version 00 has no more fields
    "00-" + "1" * 31 + "-" + "1" * 16 + "-01",  # short trace id
    "not a traceparent",
]


async def test_malformed_traceparent_is_dropped_never_refused(dsn):
    async with cluster(dsn, nodes=1, backends=1) as c:
        client = c.client(0, await c.new_key("tracing"))
        for bad in BAD_TRACEPARENTS:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=MESSAGES,
                extra_headers={"traceparent": bad, "tracestate": "vendor=abc"},
            )
            assert raw.http_response.status_code == 200, bad
            got = c.backends[0].stats.last_headers
            assert "traceparent" not in got and "tracestate" not in got, bad
        # a later version may carry more fields: passed as received
        future = "01-" + "2" * 32 + "-" + "3" * 16 + "-01-more"
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"traceparent": future}
        )
        assert c.backends[0].stats.last_headers.get("traceparent") == future


def with_tracing(receiver: OtlpReceiver, ratio: float = 1.0):
    def configure(cfg: NodeConfig) -> None:
        cfg.tracing.otlp_endpoint = receiver.url
        cfg.tracing.sample_ratio = ratio
        cfg.tracing.flush_interval_seconds = 0.05
        cfg.logging.access = True

    return configure


@pytest.fixture
async def receiver():
    r = await OtlpReceiver().start()
    yield r
    await r.close()


async def test_spans_per_request_reach_the_collector(dsn, receiver):
    with captured(access=True) as log:
        async with cluster(dsn, nodes=1, backends=2, configure=with_tracing(receiver)) as c:
            client = c.client(0, await c.new_key("tracing"))
            header, client_trace, client_parent = traceparent()
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=MESSAGES,
                extra_headers={"traceparent": header, "x-request-id": "traced-1"},
            )
            upstream_header = served_by(c, raw.headers["x-backend-id"]).stats.last_headers[
                "traceparent"
            ]
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": "t-2"}
            )
            async for _ in stream:
                pass
            await client.completions.create(
                model=MODEL, prompt="hi", max_tokens=4, extra_headers={"x-request-id": "t-3"}
            )
            await wait_for(
                lambda: len(receiver.named("server")) >= 3, timeout=10, what="3 server spans"
            )
            async with aiohttp.ClientSession() as http:
                accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
                async with http.get(f"{c.nodes[0].url}/metrics", headers=accept) as r:
                    scraped = await r.text()
    servers = receiver.named("server")
    assert sorted(s.name for s in servers) == [
        "POST /v1/chat/completions",
        "POST /v1/chat/completions",
        "POST /v1/completions",
    ]
    assert len({s.trace_id for s in servers}) == 3
    assert all(s.service["service.instance.id"] == "node-0" for s in servers)
    (first,) = [s for s in servers if s.attributes["affinity.request_id"] == "traced-1"]
    # the client's trace continues through the node
    assert (first.trace_id, first.parent_id) == (client_trace, client_parent)
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["affinity.outcome"] == "miss"
    children = {s.name: s for s in receiver.spans if s.parent_id == first.span_id}
    assert {"authenticate", "route", "upstream"} <= set(children), children
    store = [s for s in receiver.spans if s.name == "affinity.store"]
    assert store and store[0].parent_id == children["route"].span_id  # the miss's database trip
    upstream = children["upstream"]
    assert upstream.kind == "client"
    # what vLLM received names the node's upstream span as its parent, in the client's trace
    assert upstream_header == f"00-{client_trace}-{upstream.span_id}-01"
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    access = {line["request_id"]: line for line in lines if "route" in line}
    assert access["traced-1"]["trace_id"] == client_trace
    # the first request of a route carries the latency exemplars: they name its trace
    exemplars = [line for line in scraped.splitlines() if f'trace_id="{client_trace}"' in line]
    assert any(line.startswith("affinity_http_request_duration_seconds") for line in exemplars)
    assert any(line.startswith("affinity_upstream_ttft_seconds") for line in exemplars)
    by_request = {s.attributes["affinity.request_id"]: s.trace_id for s in servers}
    assert access["t-2"]["trace_id"] == by_request["t-2"]
    assert access["t-3"]["trace_id"] == by_request["t-3"]


async def test_unsampled_requests_export_nothing_but_pass_their_context(dsn, receiver):
    async with cluster(dsn, nodes=1, backends=1, configure=with_tracing(receiver, 0.0)) as c:
        client = c.client(0, await c.new_key("tracing"))
        header, trace_id, _ = traceparent("00")  # the client did not sample it either
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_headers={"traceparent": header}
        )
        got = c.backends[0].stats.last_headers["traceparent"]
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    # the node stopped: its exporter has flushed whatever it had
    assert got.startswith(f"00-{trace_id}-") and got.endswith("-00")
    assert receiver.spans == []


async def test_tracing_needs_no_collector_to_serve(dsn):
    """A collector that is down costs spans, never requests."""

    def configure(cfg: NodeConfig) -> None:
        cfg.tracing.otlp_endpoint = "http://127.0.0.1:9"  # discard port: refused
        cfg.tracing.flush_interval_seconds = 0.05

    async with cluster(dsn, nodes=1, backends=1, configure=configure) as c:
        client = c.client(0, await c.new_key("tracing"))
        for _ in range(3):
            reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            assert reply.choices[0].message.content
