"""Decoding the `usage` objects the node copied from answers, and adding them up.

vLLM reports per answer how many prompt tokens came from its prefix cache:
`usage.prompt_tokens_details.cached_tokens`, in a non-streamed body and, for a stream, in one
extra event before `data: [DONE]` when the request set `stream_options.include_usage`.

The request path only finds the usage object and copies its bytes (http/usage_wire.py). The
ledger decodes them later, a batch at a time (`add_usages`: one regex scan over vLLM's or
llama.cpp's compact objects, sums in C). Decoding each one on the request path, even from the
end of the body only, cost the node 4% of its throughput (bench-overhead: Python work is
dearer in a busy node than in a tight loop).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NamedTuple

MAX_TOKENS: Final = 2**31 - 1
"""Counts above this are not believed (a real answer is far below): clamped, so one odd
answer cannot make a whole batch unwritable."""

_DECODER: Final = json.JSONDecoder()
USAGE_SPAN: Final = 4096
"""A usage object is a few hundred bytes; this much after its key is copied and decoded at
most."""


class Usage(NamedTuple):
    """Token counts of one answer, as the backend reported them."""

    prompt: int
    cached: int
    completion: int


def _count(value: Any) -> int | None:
    """A token count: a JSON integer (not a boolean), at least 0, clamped to MAX_TOKENS."""
    if type(value) is not int or value < 0:
        return None
    return value if value <= MAX_TOKENS else MAX_TOKENS


def usage_of(obj: Any) -> Usage | None:
    """A `usage` object -> Usage, in any of the shapes vLLM answers with; None without a
    usable prompt count. Missing details mean no cached tokens; cached tokens never exceed
    the prompt.

    - chat, completions, embeddings: `prompt_tokens`, `prompt_tokens_details.cached_tokens`,
      `completion_tokens`;
    - Responses: `input_tokens`, `input_tokens_details.cached_tokens`, `output_tokens`;
    - Anthropic Messages: `input_tokens` counts only what was not read from the cache, so the
      prompt is it plus `cache_read_input_tokens` (and `cache_creation_input_tokens`).
    """
    if type(obj) is not dict:
        return None
    prompt = _count(obj.get("prompt_tokens"))
    if prompt is not None:
        details = obj.get("prompt_tokens_details")
        completion = _count(obj.get("completion_tokens"))
    else:
        prompt = _count(obj.get("input_tokens"))
        if prompt is None:
            return None
        completion = _count(obj.get("output_tokens"))
        if "cache_read_input_tokens" in obj or "cache_creation_input_tokens" in obj:
            read = _count(obj.get("cache_read_input_tokens")) or 0
            created = _count(obj.get("cache_creation_input_tokens")) or 0
            total = min(prompt + read + created, MAX_TOKENS)
            return Usage(total, read, completion or 0)
        details = obj.get("input_tokens_details")
    cached = _count(details.get("cached_tokens")) if type(details) is dict else 0
    return Usage(prompt, min(cached or 0, prompt), completion or 0)


def merged_usage(first: bytes | None, last: bytes | None) -> bytes | None:
    """One usage object from a stream that splits it (Anthropic: input counts in
    message_start, output in message_delta): the last event's counts win, the first's fill
    in what it lacks."""
    if first is None or last is None or first is last:
        return last
    a, b = _object(first), _object(last)
    if a is None or b is None:
        return last
    return json.dumps({**a, **b}, separators=(",", ":")).encode()


def _object(raw: bytes) -> dict[str, Any] | None:
    try:
        obj, _end = _DECODER.raw_decode(raw[:USAGE_SPAN].decode("utf-8", "replace"))
    except ValueError:
        return None
    return obj if type(obj) is dict else None


_VLLM_USAGES: Final = re.compile(
    rb'\x00\{"prompt_tokens":(\d{1,9}),"total_tokens":\d{1,10},"completion_tokens":(\d{1,9})'
    rb'(?:,"prompt_tokens_details":(?:null|\{"cached_tokens":(?:null|(\d{1,9}))\}))?\}'
)
"""vLLM's usage object as its pydantic model (UsageInfo) writes it: compact, fields in this
order, details with `cached_tokens` only when the server runs with
`--enable-prompt-tokens-details`; at the start of each record, each preceded by a NUL (JSON
text holds none; a literal first byte lets the scan skip ahead, 3x faster than matching
`(?:^|\x00)` at every byte). Anything else (OpenAI's field order, spaces, other fields) is
decoded as JSON, and so are counts of ten digits or more (clamped to MAX_TOKENS)."""


_LLAMACPP_USAGES: Final = re.compile(
    rb'\x00\{"completion_tokens":(\d{1,9}),"prompt_tokens":(\d{1,9}),"total_tokens":\d{1,10}'
    rb'(?:,"prompt_tokens_details":\{"cached_tokens":(\d{1,9})\})?\}'
)
"""llama.cpp's usage object (chat and completions, streamed or not), as its server writes it:
compact, keys in alphabetical order (nlohmann::json), `prompt_tokens_details.cached_tokens`
always there. Its Responses and Messages usages take the JSON path."""

_FAST_PATHS: Final = (
    (b'{"prompt_tokens":', _VLLM_USAGES, 0, 1),
    (b'{"completion_tokens":', _LLAMACPP_USAGES, 1, 0),
)
"""Each engine's first bytes, its pattern, the groups of its prompt and completion counts
(cached is the third). A batch holds one backend's answers (one ledger row), so one engine's
spelling: the first object picks the pattern; a batch it does not read whole is decoded object
by object."""


def add_usages(counts: list[int], usages: list[bytes]) -> int:
    """Adds the usage objects' prompt, cached and completion tokens to counts[1:4]; returns how
    many could not be read. When each is vLLM's or llama.cpp's compact form, one scan over them
    all and sums in C; otherwise each is decoded as JSON. Cached tokens never exceed the prompt
    tokens (per object when decoded one by one, per batch on the fast path)."""
    for start, pattern, prompt_at, completion_at in _FAST_PATHS:
        if not usages or not usages[0].startswith(start):
            continue
        found = pattern.findall(b"\x00" + b"\x00".join(usages))
        if len(found) == len(usages):
            groups = tuple(zip(*found, strict=True))
            prompt, completion, cached = groups[prompt_at], groups[completion_at], groups[2]
            p = sum(map(int, prompt))
            counts[1] += p
            counts[2] += min(sum(map(int, filter(None, cached))), p)
            counts[3] += sum(map(int, completion))
            return 0
    unreadable = 0
    for raw in usages:
        usage = decode_usage(raw)
        if usage is None:
            unreadable += 1
            continue
        counts[1] += usage.prompt
        counts[2] += usage.cached
        counts[3] += usage.completion
    return unreadable


def decode_usage(raw: bytes) -> Usage | None:
    """The usage object at the start of `raw` (bytes from its `{`, maybe more after it)."""
    text = raw[:USAGE_SPAN].decode("utf-8", "replace")
    try:
        obj, _end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return usage_of(obj)
