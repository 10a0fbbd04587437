"""W3C trace context checks, the access log's client address and key reference."""

from __future__ import annotations

import hashlib
import hmac
import uuid

import pytest

from affinity_node.observability.logs import KeyRefs, client_address, trusted_networks
from affinity_node.observability.tracing import (
    trace_context,
    trace_id_of,
    traces_url,
    valid_traceparent,
)

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{SPAN}-01"


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (GOOD, True),
        (f"00-{TRACE}-{SPAN}-00", True),
        (f"cc-{TRACE}-{SPAN}-01-future-part", True),
        (f"cc-{TRACE}-{SPAN}-01", True),
        (f"cc-{TRACE}-{SPAN}-01x", False),
        (f"00-{TRACE}-{SPAN}-01-", False),
        (f"ff-{TRACE}-{SPAN}-01", False),
        (f"00-{'0' * 32}-{SPAN}-01", False),
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"00-{TRACE.upper()}-{SPAN}-01", False),
        (f"00-{TRACE[:-1]}-{SPAN}-01", False),
        (f"00-{TRACE}-{SPAN}-1", False),
        (f" {GOOD}", False),
        ("", False),
    ],
)
def test_traceparent_format(value: str, valid: bool) -> None:
    assert valid_traceparent(value) is valid
    assert trace_id_of(value) == (TRACE if valid else None)


def test_trace_context_headers() -> None:
    assert trace_context([GOOD], []) == {"traceparent": GOOD}
    assert trace_context([GOOD], ["a=1", " b=2"]) == {"traceparent": GOOD, "tracestate": "a=1,b=2"}
    assert trace_context([GOOD, GOOD], ["a=1"]) == {}  # two traceparents: which one?
    assert trace_context(["bad"], ["a=1"]) == {}  # a tracestate goes only with its parent
    assert trace_context([GOOD], ["a=\x01"]) == {"traceparent": GOOD}
    assert trace_context([GOOD], ["a=" + "x" * 600]) == {"traceparent": GOOD}
    assert trace_context([GOOD], ["a=é"]) == {"traceparent": GOOD}


def test_collector_url_gets_the_traces_path() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://x/otlp/v1/traces") == "https://x/otlp/v1/traces"


def test_client_address_believes_only_trusted_hops() -> None:
    lb = trusted_networks(["10.0.0.0/8", "fd00::/8"])
    assert client_address("192.0.2.1", ["203.0.113.5"], lb) == "192.0.2.1"  # not a proxy
    assert client_address("10.1.2.3", ["203.0.113.5"], lb) == "203.0.113.5"
    assert client_address("10.1.2.3", ["1.1.1.1, 203.0.113.5, 10.9.9.9"], lb) == "203.0.113.5"
    assert client_address("10.1.2.3", ["1.1.1.1", "10.9.9.9"], lb) == "1.1.1.1"  # two lines
    assert client_address("fd00::1", ["2001:db8::7"], lb) == "2001:db8::7"
    assert client_address("10.1.2.3", [], lb) == "10.1.2.3"  # nothing forwarded
    assert client_address("10.1.2.3", ["10.4.4.4"], lb) == "10.4.4.4"  # all hops trusted
    assert client_address("10.1.2.3", ["not-an-ip"], lb) is None  # garbage is not logged
    assert client_address("10.1.2.3", ["203.0.113.5"], ()) == "10.1.2.3"  # none trusted


def test_key_ref_is_a_keyed_hash_never_the_id() -> None:
    key = uuid.uuid4()
    refs = KeyRefs("s3cret")
    ref = refs(key)
    expected = hmac.new(b"s3cret", key.bytes, hashlib.sha256).hexdigest()[:24]
    assert ref == expected == KeyRefs("s3cret")(key)  # stable: every node, every restart
    assert ref != KeyRefs("other")(key) and ref != refs(uuid.uuid4())
    assert key.hex not in ref and str(key) not in ref
    assert KeyRefs("")(key) is None and refs(None) is None  # no secret: no reference
    assert KeyRefs("", names={key: "team-a"}.get)(key) == "team-a"  # opted in: the name
