"""Reading routing fields from a body without building it: the same answers as a full parse,
the same refusals for what the proxy reads, splices that leave the rest byte for byte."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinity_node.http import payload as payload_module
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
        b'{"model":"m","model":"m"}',  # compact: the walk is skipped only at the exact size
        '{"é":1,"é":2,"model":"m"}'.encode(),  # a key of 2 bytes and 1 character, compact
    ],
)
def test_a_top_level_key_given_twice_is_refused(body: bytes) -> None:
    err = error(body)
    assert err.status == 400 and err.code == "invalid_json" and "repeats a key" in err.message


def test_a_compact_body_with_a_key_that_is_not_ascii_is_read() -> None:
    p = Payload('{"model":"m","é":[1]}'.encode())
    got = p.get("é")
    assert p.model == "m" and isinstance(got, LazyList) and list(got) == [1]


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


# Large bodies: simdjson checks them first; every answer must be the one msgspec gives.

PAD = "x" * payload_module.SIMD_FROM


def outcome(body: bytes, simd: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """What the node learns from a body, through one checker: the refusal, or the fields."""
    monkeypatch.setattr(payload_module, "SIMD_FROM", 0 if simd else 1 << 62)
    try:
        p = Payload(body)
    except ApiError as err:
        return ("refused", err.status, err.code, err.message, err.param)
    assert simd or p._values is None  # (with simd on, msgspec may still be handed the body)
    values = {}
    for key in ("messages", "n", "pad", "stream_options", "absent", "a", "model"):
        got = p.get(key, "default")
        values[key] = list(got) if isinstance(got, LazyList) else got
    return ("read", p.model, p.stream, values, "a" in p, p.with_model("canonical"))


def both(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    fast, full = outcome(body, True, monkeypatch), outcome(body, False, monkeypatch)
    assert fast == full, body[:200]
    return fast


LARGE_CASES = [
    b'{"model": "m", "pad": "' + PAD.encode() + b'", "model": "m"}',
    b'{"model": "m", "mod\\u0065l": "n", "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "a\\u0000b": 1, "a\\u0000c": 2, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "a\\u0000": 1, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "x": NaN, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "pad": "' + PAD.encode() + b'", "a": ' + b"[" * 100_000,
    b'{"model": "m", "pad": "' + PAD.encode() + b'", "a": ' + b"[" * 1100 + b"]" * 1100 + b"}",
    b'{"model": "m", "pad": "' + PAD.encode() + b'", "v": "\xff\xfe"}',
    b'{"model": "\xff", "pad": "' + PAD.encode() + b'"}',
    b'\xef\xbb\xbf{"model": "m", "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "n": 1e400, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "n": 1' + b"0" * 5000 + b', "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "n": 18446744073709551615, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "n": -0, "a": -0.0, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "pad": "' + PAD.encode() + b'"} trailing',
    b'{"model": "m", "pad": "' + PAD.encode() + b'",}',
    b'[{"model": "m", "pad": "' + PAD.encode() + b'"}]',
    b'{"model": 7, "pad": "' + PAD.encode() + b'"}',
    b'{"model": null, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "' + b"m" * 300 + b'", "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "stream": 1, "pad": "' + PAD.encode() + b'"}',
    b'{"model": "m", "stream": null, "pad": "' + PAD.encode() + b'"}',
    b' \n{"model": "m", "stream": true, "pad": "' + PAD.encode() + b'"} \n',
    b'{"model": "m", "pad": "\\ud800' + PAD.encode() + b'"}',
    b'{"model": "m", "pad": "' + PAD.encode() + b'\n"}',
]


@pytest.mark.parametrize("body", LARGE_CASES, ids=range(len(LARGE_CASES)))
def test_large_bodies_get_msgspecs_answers(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    both(body, monkeypatch)


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    stream=st.none() | st.booleans() | st.integers(0, 1),
    compact=st.booleans(),
    ascii_only=st.booleans(),
    cut=st.integers(0, 2**16),
    byte=st.integers(0, 255),
)
def test_simdjson_and_msgspec_agree_on_any_large_body(
    extra: dict[str, Any],
    stream: bool | int | None,
    compact: bool,
    ascii_only: bool,
    cut: int,
    byte: int,
) -> None:
    """A valid body, then the same body with one byte changed: the same refusal or the same
    fields either way."""
    doc = {"model": "m-é", **extra, "messages": [{"role": "user", "content": PAD}]}
    if stream is not None:
        doc["stream"] = stream
    separators = (",", ":") if compact else None
    body = json.dumps(doc, separators=separators, ensure_ascii=ascii_only).encode()
    with pytest.MonkeyPatch.context() as monkeypatch:
        both(body, monkeypatch)
        # A change near either end, away from the padding: where it can break the structure.
        at = cut % 200 if cut % 2 else len(body) - 1 - cut % 200
        both(body[:at] + bytes([byte]) + body[at + 1 :], monkeypatch)


def test_a_large_valid_body_is_read_from_simdjsons_parse() -> None:
    """The fast path is taken (no msgspec pass until an array is asked for), body after body:
    the shared parser is free again once each body is read."""
    messages = [{"role": "user", "content": PAD}, {"role": "assistant", "content": "a"}]
    options = {"include_usage": False, "x": [1, {"y": None}]}
    body = json.dumps({"model": "m", "messages": messages, "stream": True, "o": options})
    for _ in range(3):
        p = Payload(body.encode())
        assert p._values is not None and p._fields_ is None
        assert p.model == "m" and p.stream is True and p.get("o") == options and "o" in p
        assert p._fields_ is None
        lazy = p.get("messages")
        assert isinstance(lazy, LazyList) and len(lazy) == 2
        assert lazy[1] == messages[1] and lazy[0:2] == messages and list(lazy) == messages


def test_a_proxy_kept_by_mistake_costs_one_body_the_fast_path_not_all_later_ones() -> None:
    body = json.dumps({"model": "m", "pad": PAD}).encode()
    kept = payload_module._PARSER.parse(body)  # a proxy into the shared parser's document
    held = Payload(body)
    assert held._values is None and held.model == "m"  # msgspec read it: same answer
    assert Payload(body)._values is not None  # a fresh parser took over
    del kept
