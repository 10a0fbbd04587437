"""Reading `usage` from answers: non-streamed bodies from the end, streams chunk by chunk with
the usage event removed when the node (not the client) asked for it, whatever the chunking."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from affinity_node.http.payload import Payload
from affinity_node.http.usage_wire import (
    StreamUsage,
    usage_from_body,
    usage_request,
    usage_span,
    with_usage,
)
from affinity_node.ledger import usage as usage_module
from affinity_node.ledger.usage import MAX_TOKENS, Usage, add_usages, decode_usage, usage_of

VLLM_USAGE = {
    "prompt_tokens": 120,
    "total_tokens": 136,
    "completion_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 96},
}


def body(usage: Any, content: str = "Hello there", compact: bool = True, **extra: Any) -> bytes:
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        "usage": usage,
        **extra,
    }
    return json.dumps(doc, separators=(",", ":") if compact else None).encode()


@pytest.mark.parametrize("compact", [True, False])
def test_a_body_s_usage_with_cached_tokens(compact: bool) -> None:
    assert usage_from_body(body(VLLM_USAGE, compact=compact)) == Usage(120, 96, 16)


def test_keys_after_usage_and_a_usage_key_first() -> None:
    # vLLM adds keys after usage; another server may put usage before the choices.
    assert usage_from_body(body(VLLM_USAGE, prompt_logprobs=None, kv=None)) == Usage(120, 96, 16)
    doc = {"usage": VLLM_USAGE, "choices": [{"message": {"content": "x"}}]}
    assert usage_from_body(json.dumps(doc).encode()) == Usage(120, 96, 16)


@pytest.mark.parametrize(
    "content",
    [
        '{"usage": {"prompt_tokens": 999999}}',  # JSON in the answer's text: escaped quotes
        'the "usage": {"prompt_tokens": 5} of it',
        "usage",
        '\\"usage\\": {',
    ],
)
def test_usage_written_in_the_answer_text_is_not_taken(content: str) -> None:
    assert usage_from_body(body(VLLM_USAGE, content=content)) == Usage(120, 96, 16)
    assert usage_from_body(body(None, content=content)) is None


def test_the_request_path_only_copies_the_usage_object_s_bytes() -> None:
    raw = usage_span(body(VLLM_USAGE, prompt_logprobs=None))
    assert raw is not None and raw.startswith(b'{"prompt_tokens":120') and raw.endswith(b"null}")
    assert decode_usage(raw) == Usage(120, 96, 16)
    assert usage_span(body(None)) is None
    assert decode_usage(b"{") is None


def compact(prompt: int, completion: int, cached: int | None) -> bytes:
    """vLLM's own spelling: compact, its field order, details only with cached tokens."""
    doc: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:
        doc["prompt_tokens_details"] = {"cached_tokens": cached}
    return json.dumps(doc, separators=(",", ":")).encode() + b',"prompt_logprobs":null}'


def test_a_batch_of_vllm_usages_is_added_in_one_scan_or_one_by_one() -> None:
    vllm = [compact(100, 10, 64), compact(50, 5, None), compact(30, 3, 0)]
    vllm.append(
        b'{"prompt_tokens":1,"total_tokens":1,"completion_tokens":0,'
        b'"prompt_tokens_details":{"cached_tokens":null}}\n'
    )
    vllm.append(
        b'{"prompt_tokens":2,"total_tokens":2,"completion_tokens":0,"prompt_tokens_details":null}'
    )
    counts = [0, 0, 0, 0]
    assert add_usages(counts, vllm) == 0
    assert counts == [0, 183, 64, 18]
    # one object in another spelling: every one is decoded, the same sums
    other = json.dumps({"prompt_tokens": 20, "prompt_tokens_details": {"cached_tokens": 16}})
    counts = [0, 0, 0, 0]
    assert add_usages(counts, [*vllm, other.encode(), b'{"prompt_tokens": "x"}']) == 1
    assert counts == [0, 203, 80, 18]
    # absurd counts are not summed as they are
    counts = [0, 0, 0, 0]
    assert add_usages(counts, [compact(10**12, 1, 10**12)]) == 0
    assert counts == [0, MAX_TOKENS, MAX_TOKENS, 1]


LLAMACPP_BODY = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    b'"content":"4 m"}}],"created":1796587638,"model":"tiny-llama","system_fingerprint":'
    b'"b0-unknown","object":"chat.completion","usage":{"completion_tokens":4,"prompt_tokens":49,'
    b'"total_tokens":53,"prompt_tokens_details":{"cached_tokens":48}},"id":"chatcmpl-X",'
    b'"timings":{"cache_n":48,"prompt_n":1}}'
)
"""A llama.cpp answer as its server wrote it (xllamacpp 2026.10): keys in alphabetical order."""


def llamacpp(prompt: int, completion: int, cached: int) -> bytes:
    raw = usage_span(LLAMACPP_BODY.replace(b":49,", b":%d," % prompt))
    assert raw is not None
    raw = raw.replace(b'"completion_tokens":4', b'"completion_tokens":%d' % completion)
    return raw.replace(b'"cached_tokens":48', b'"cached_tokens":%d' % cached)


def test_a_batch_of_llama_cpp_usages_is_added_in_one_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert usage_from_body(LLAMACPP_BODY) == Usage(49, 48, 4)
    batch = [llamacpp(49, 4, 48), llamacpp(120, 16, 96), llamacpp(7, 1, 0)]
    decoded: list[bytes] = []
    monkeypatch.setattr(usage_module, "decode_usage", lambda raw: decoded.append(raw))
    counts = [0, 0, 0, 0]
    assert add_usages(counts, batch) == 0
    assert counts == [0, 176, 144, 21]
    assert decoded == []  # none decoded one by one
    monkeypatch.undo()
    # with one object in another spelling, every one is decoded: the same sums
    counts = [0, 0, 0, 0]
    assert add_usages(counts, [*batch, json.dumps({"prompt_tokens": 3}).encode()]) == 0
    assert counts == [0, 179, 144, 21]


def test_no_usage_or_no_prompt_tokens() -> None:
    assert usage_from_body(body(None)) is None
    assert usage_from_body(b"") is None
    assert usage_from_body(b'{"usage": {"prompt_tokens": ') is None  # cut short
    assert usage_from_body(body({"completion_tokens": 3})) is None
    assert usage_from_body(b"not json at all") is None


def test_odd_counts() -> None:
    assert usage_of({"prompt_tokens": 10}) == Usage(10, 0, 0)
    assert usage_of({"prompt_tokens": 10, "prompt_tokens_details": None}) == Usage(10, 0, 0)
    assert usage_of(
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": None}}
    ) == Usage(10, 0, 0)
    # cached never exceeds the prompt; booleans, negatives and floats are not counts
    assert usage_of({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 50}}) == Usage(
        10, 10, 0
    )
    assert usage_of({"prompt_tokens": True}) is None
    assert usage_of({"prompt_tokens": -1}) is None
    assert usage_of({"prompt_tokens": 1.5}) is None
    assert usage_of({"prompt_tokens": 10**30, "completion_tokens": 10**30}) == Usage(
        MAX_TOKENS, 0, MAX_TOKENS
    )
    assert usage_of([1, 2]) is None


# -- what a stream asks for ------------------------------------------------------------------


def test_which_streams_the_node_asks_for_usage() -> None:
    assert not usage_request({"stream": False}).inject
    assert usage_request({"stream": True}).inject
    assert usage_request({"stream": True, "stream_options": {}}).inject
    assert usage_request({"stream": True, "stream_options": {"include_usage": False}}).inject
    asked = usage_request({"stream": True, "stream_options": {"include_usage": True}})
    assert asked.client_asked and not asked.inject
    # usage in every chunk is the client's business; a malformed option the backend's
    assert not usage_request(
        {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    ).inject
    assert not usage_request({"stream": True, "stream_options": "yes"}).inject


@pytest.mark.parametrize(
    "text",
    [
        '{"model": "m", "stream": true, "messages": [{"role": "user", "content": "{}"}]}',
        '  \n {"model":"m","stream":true}',
    ],
)
def test_the_body_that_asks_is_the_client_s_with_one_field_more(text: str) -> None:
    payload = json.loads(text)
    sent = with_usage(text.encode(), payload)
    assert json.loads(sent) == {**payload, "stream_options": {"include_usage": True}}
    assert sent.endswith(text.encode()[-20:])  # spliced in, not re-encoded


def test_the_node_s_payload_asks_as_a_dict_does() -> None:
    """The request path hands over its undecoded Payload, not a dict."""
    for doc in (
        {"model": "m", "stream": True},
        {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
        {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}},
        {"model": "m", "stream": True, "stream_options": None},
    ):
        raw = json.dumps(doc).encode()
        assert usage_request(Payload(raw)) == usage_request(doc)
        if usage_request(doc).inject:
            assert with_usage(raw, Payload(raw)) == with_usage(raw, doc)


def test_null_options_are_replaced_not_repeated() -> None:
    payload = {"model": "m", "stream": True, "stream_options": None}
    sent = with_usage(json.dumps(payload).encode(), payload)
    assert sent.count(b"stream_options") == 1
    assert json.loads(sent)["stream_options"] == {"include_usage": True}


def test_a_body_in_another_encoding_is_encoded_again() -> None:
    payload = {"model": "m", "stream": True}
    for raw in (
        json.dumps(payload).encode("utf-16"),
        b"\xef\xbb\xbf" + json.dumps(payload).encode(),
    ):
        sent = with_usage(raw, payload)
        assert json.loads(sent) == {**payload, "stream_options": {"include_usage": True}}


def test_the_body_that_asks_keeps_the_other_options() -> None:
    payload = {"model": "m", "stream": True, "stream_options": {"other": 1}}
    sent = json.loads(with_usage(json.dumps(payload).encode(), payload))
    assert sent == {**payload, "stream_options": {"other": 1, "include_usage": True}}
    assert payload["stream_options"] == {"other": 1}  # the client's payload is untouched


# -- streams ---------------------------------------------------------------------------------


def event(doc: Any, crlf: bool = False) -> bytes:
    end = b"\r\n\r\n" if crlf else b"\n\n"
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + end


def chunk_event(piece: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if piece is None else {"content": piece}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def stream(with_usage_event: bool, crlf: bool = False, pieces: tuple[str, ...] = ()) -> bytes:
    pieces = pieces or ("Hel", "lo", " usage", '"usage"', "!")
    out = [event(chunk_event(p), crlf) for p in pieces]
    out.append(event(chunk_event(None, "stop"), crlf))
    if with_usage_event:
        out.append(event({"id": "c", "choices": [], "usage": VLLM_USAGE}, crlf))
    out.append(b"data: [DONE]" + (b"\r\n\r\n" if crlf else b"\n\n"))
    return b"".join(out)


def relay(data: bytes, cuts: list[int], strip: bool) -> tuple[bytes, StreamUsage]:
    watch = StreamUsage(strip=strip)
    out = []
    bounds = [0, *cuts, len(data)]
    for a, b in itertools.pairwise(bounds):
        out.append(watch.feed(data[a:b]))
    out.append(watch.finish())
    return b"".join(out), watch


@pytest.mark.parametrize("crlf", [False, True])
def test_the_usage_event_is_removed_at_any_chunk_boundary(crlf: bool) -> None:
    upstream = stream(with_usage_event=True, crlf=crlf)
    expected = stream(with_usage_event=False, crlf=crlf)
    for cut in range(len(upstream) + 1):
        for second in (cut + 1, cut + 7, cut + 50):
            cuts = [c for c in (cut, second) if c <= len(upstream)]
            out, watch = relay(upstream, cuts, strip=True)
            assert out == expected, (cuts, out)
            assert watch.usage == Usage(120, 96, 16), cuts


@pytest.mark.parametrize("crlf", [False, True])
def test_a_client_that_asked_gets_every_byte(crlf: bool) -> None:
    upstream = stream(with_usage_event=True, crlf=crlf)
    for cut in range(len(upstream) + 1):
        out, watch = relay(upstream, [cut], strip=False)
        assert out == upstream
        assert watch.usage == Usage(120, 96, 16)


def test_byte_by_byte() -> None:
    upstream = stream(with_usage_event=True)
    out, watch = relay(upstream, list(range(1, len(upstream))), strip=True)
    assert out == stream(with_usage_event=False)
    assert watch.usage == Usage(120, 96, 16)


def test_a_stream_without_usage_passes_unchanged() -> None:
    upstream = stream(with_usage_event=False)
    for cut in range(len(upstream) + 1):
        out, watch = relay(upstream, [cut], strip=True)
        assert out == upstream and watch.usage is None


def test_null_usage_in_every_chunk_is_left_alone() -> None:
    # OpenAI itself adds "usage": null to every chunk when include_usage is set.
    chunks = [event({**chunk_event("a"), "usage": None}) for _ in range(3)]
    chunks.append(event({"id": "c", "choices": [], "usage": VLLM_USAGE}))
    upstream = b"".join(chunks) + b"data: [DONE]\n\n"
    out, watch = relay(upstream, [], strip=False)
    assert out == upstream and watch.usage == Usage(120, 96, 16)


def test_a_last_line_without_its_end_is_still_relayed() -> None:
    upstream = b"data: {}\n\ndata: [DONE]"
    for cut in range(len(upstream) + 1):
        out, _ = relay(upstream, [cut], strip=True)
        assert out == upstream


def test_partial_lines_are_held_only_up_to_a_bound() -> None:
    watch = StreamUsage(strip=True)
    assert watch.feed(b"data: {") == b""  # held until its line ends
    huge = b"x" * 70_000
    assert watch.feed(huge) == b"data: {" + huge  # past the bound it goes as it is
    watch.feed(b"partial")
    watch.discard()  # the stream broke: nothing held is ever written
    assert watch.finish() == b""


def test_usage_in_every_chunk_is_kept_and_the_last_one_counts() -> None:
    # vLLM's continuous_usage_stats (the client asked): running totals, the last is final.
    chunks = [
        event({**chunk_event("a"), "usage": {**VLLM_USAGE, "completion_tokens": i}})
        for i in range(1, 4)
    ]
    chunks.append(event({"id": "c", "choices": [], "usage": VLLM_USAGE}))
    upstream = b"".join(chunks) + b"data: [DONE]\n\n"
    for cuts in ([], [len(chunks[0]) + 3], [len(upstream) - 20]):
        out, watch = relay(upstream, cuts, strip=False)
        assert out == upstream and watch.usage == Usage(120, 96, 16)
    # Were they the node's (a backend that adds usage to every event unasked), each event's
    # line goes as long as events come one per read, as a backend writes them.
    cuts = list(itertools.accumulate(len(c) for c in chunks))
    out, watch = relay(upstream, cuts, strip=True)
    assert out == b"data: [DONE]\n\n" and watch.usage == Usage(120, 96, 16)
