"""Reading routing fields from a body without building it: the same answers as a full parse,
the same refusals for what the proxy reads, splices that leave the rest byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_node.http.errors import ApiError
from affinity_node.http.payload import LazyList, Payload

MODEL = "llama-3.1-8b"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def error(body: bytes) -> ApiError:
    with pytest.raises(ApiError) as caught:
        Payload(body)
    return caught.value


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    stream=st.none() | st.booleans(),
    indent=st.none() | st.integers(0, 3),
    compact=st.booleans(),
    ascii_only=st.booleans(),
)
def test_reads_what_a_full_parse_reads(
    extra: dict[str, Any],
    stream: bool | None,
    indent: int | None,
    compact: bool,
    ascii_only: bool,
) -> None:
    doc = {k: v for k, v in extra.items() if k not in ("model", "stream")}
    doc["model"] = MODEL + "-é"
    if stream is not None:
        doc["stream"] = stream
    separators = (",", ":") if compact else None
    body = json.dumps(doc, indent=indent, separators=separators, ensure_ascii=ascii_only).encode()
    p = Payload(body)
    assert p.model == doc["model"] and p.stream is bool(stream)
    for key, value in doc.items():
        got = p.get(key)
        assert (list(got) if isinstance(got, LazyList) else got) == value
    assert p.get("absent", 7) == 7
    renamed = json.loads(p.with_model("canonical"))
    assert renamed == {**doc, "model": "canonical"}
    assert p.with_model(doc["model"]) is body  # nothing rewritten: the bytes as received


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "a", "model": "b"}',
        b'{"model": "a", "model": "a"}',  # the same value twice is still two keys
        b'{"model":"a","stream":true,"model":"a"}',
        b'{"model": "b", "mod\\u0065l": "a"}',  # an escaped spelling of the same key
        b'{"x": 1, "x": [1, 2], "model": "m"}',
        b'{ "model" : "m" ,\n "stream" : false , "stream" : true }',
        b'{"model": "m", "n": 12, "n": 1}',  # the earlier value starts like the last one
        b'{"model": "m", "n": 1.5, "n": 1}',
    ],
)
def test_a_top_level_key_given_twice_is_refused(body: bytes) -> None:
    err = error(body)
    assert err.status == 400 and err.code == "invalid_json" and "repeats a key" in err.message


def test_inside_values_the_backend_judges() -> None:
    """Nested duplicates and numbers beyond Python's int limit are forwarded untouched."""
    body = (
        b'{"model": "m", "messages": [{"role": "user", "role": "x"}], "n": 1' + b"0" * 5000 + b"}"
    )
    p = Payload(body)
    assert p.model == "m" and p.with_model("m") is body


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{nope", "invalid_json"),
        (b"", "invalid_json"),
        (b'{"model": "m"} trailing', "invalid_json"),
        (b'{"model": "m", "x": NaN}', "invalid_json"),
        (b'{"model": "m", "a": ' + b"[" * 100_000, "invalid_json"),
        (b'{"model": "' + bytes([0xFF, 0xFE, 0xC3]) + b'"}', "invalid_json"),
        (b"[1, 2]", None),
        (b"[" * 100_000 + b"]" * 100_000, None),  # not an object, however deep
        (b'"hi"', None),
        (b'{"messages": []}', "missing_required_parameter"),
        (b'{"model": null}', "missing_required_parameter"),
        (b'{"model": 7}', "invalid_type"),
        (b'{"model": ""}', "invalid_type"),
        (b'{"model": {"a": 1}}', "invalid_type"),
        (json.dumps({"model": "m" * 300}).encode(), "invalid_value"),
        (b'{"model": "m", "stream": "yes"}', "invalid_type"),
        (b'{"model": "m", "stream": 1}', "invalid_type"),
    ],
)
def test_bad_bodies_get_the_errors_they_got_before(body: bytes, code: str | None) -> None:
    err = error(body)
    assert err.status == 400 and err.code == code


def test_a_value_read_later_that_cannot_be_decoded_reads_as_absent() -> None:
    body = b'{"model": "m", "prompt_cache_key": "\xff", "messages": [{"a": "\xfe"}, 1]}'
    p = Payload(body)
    assert p.get("prompt_cache_key", "none") == "none"
    assert list(p.get("messages")) == [None, 1]


def test_stream_null_is_not_streaming() -> None:
    assert Payload(b'{"model": "m", "stream": null}').stream is False


def test_messages_decode_one_at_a_time() -> None:
    messages = [{"role": "system", "content": "s"}] + [{"role": "user", "content": "u"}] * 50
    p = Payload(json.dumps({"model": "m", "messages": messages}).encode())
    lazy = p.get("messages")
    assert isinstance(lazy, LazyList) and len(lazy) == 51
    assert lazy[0] == messages[0] and lazy[1:3] == messages[1:3] and list(lazy) == messages
