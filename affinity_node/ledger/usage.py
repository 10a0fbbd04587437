"""Reading `usage` from the answers the node forwards, without slowing the relay.

vLLM reports per answer how many prompt tokens came from its prefix cache:
`usage.prompt_tokens_details.cached_tokens`, in a non-streamed body and, for a stream, in one
extra event before `data: [DONE]` when the request set `stream_options.include_usage`.

- The request path only finds the usage object and copies its bytes (`usage_span`,
  `StreamUsage.raw`): a few C-level byte operations. The ledger decodes them later, a batch
  at a time (`add_usages`: one regex scan over vLLM's compact objects, sums in C). Decoding
  each one on the request path, even from the end of the body only, cost the node 4% of its
  throughput (bench-overhead: Python work is dearer in a busy node than in a tight loop).
- A non-streamed body is searched from its end for the last `"usage"` key (vLLM and OpenAI put
  it after the choices).
- A stream is relayed as it arrives. Per chunk the watcher does a substring search and, when a
  chunk ends inside a line, holds that partial line back until its end arrives (the client
  could not use it before). Only a line with a usage object is looked at more closely.
- When the client did not ask for usage, the node asks the backend for it (`with_usage`) and
  the watcher removes that event, so the client gets the stream it would get from vLLM
  directly. Only vllm backends are asked: other servers may reject the field or add
  `"usage": null` to every chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

MAX_TOKENS: Final = 2**31 - 1
"""Counts above this are not believed (a real answer is far below): clamped, so one odd
answer cannot make a whole batch unwritable."""

_USAGE_KEY: Final = b'"usage"'
_USAGE_OBJECT: Final = re.compile(rb'(?<!\\)"usage"\s*:\s*\{')
_DECODER: Final = json.JSONDecoder()
_USAGE_SPAN: Final = 4096
"""A usage object is a few hundred bytes; this much after its key is decoded at most."""
MAX_HELD: Final = 65536
"""A partial line longer than this is relayed as it is (no usage event is that long)."""


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
        obj, _end = _DECODER.raw_decode(raw[:_USAGE_SPAN].decode("utf-8", "replace"))
    except ValueError:
        return None
    return obj if type(obj) is dict else None


_VLLM_USAGES: Final = re.compile(
    rb'(?:^|\x00)\{"prompt_tokens":(\d{1,9}),"total_tokens":\d{1,10},"completion_tokens":(\d{1,9})'
    rb'(?:,"prompt_tokens_details":(?:null|\{"cached_tokens":(?:null|(\d{1,9}))\}))?\}'
)
"""vLLM's usage object as its pydantic model (UsageInfo) writes it: compact, fields in this
order, details with `cached_tokens` only when the server runs with
`--enable-prompt-tokens-details`; at the start of each NUL-separated record (JSON text holds
no NUL byte). Anything else (OpenAI's field order, spaces, other fields) is decoded as JSON,
and so are counts of ten digits or more (clamped to MAX_TOKENS)."""


def add_usages(counts: list[int], usages: list[bytes]) -> int:
    """Adds the usage objects' prompt, cached and completion tokens to counts[1:4]; returns how
    many could not be read. When each is vLLM's compact form, one scan over them all and sums
    in C; otherwise each is decoded as JSON. Cached tokens never exceed the prompt tokens
    (per object when decoded one by one, per batch on the fast path)."""
    found = _VLLM_USAGES.findall(b"\x00".join(usages))
    if found and len(found) == len(usages):
        prompt, completion, cached = zip(*found, strict=True)
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
    text = raw[:_USAGE_SPAN].decode("utf-8", "replace")
    try:
        obj, _end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return usage_of(obj)


def usage_span(data: bytes) -> bytes | None:
    """The bytes of a non-streamed answer's top-level usage object (from its `{`, at most
    `_USAGE_SPAN` of them), found from the end of the body; None when it has none."""
    end = len(data)
    while True:
        i = data.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return None
        m = _USAGE_OBJECT.match(data, i)  # None after a backslash: inside a string
        if m is not None:
            start = m.end() - 1
            return data[start : start + _USAGE_SPAN]
        end = i  # inside a string (escaped quote) or not an object: look further back


def usage_from_body(data: bytes) -> Usage | None:
    """Both steps at once (what the ledger ends up with for a body)."""
    raw = usage_span(data)
    return None if raw is None else decode_usage(raw)


@dataclass(frozen=True, slots=True)
class UsageRequest:
    """What a streamed request asks about usage, and what the node adds."""

    client_asked: bool
    """The client set `stream_options.include_usage`: the usage event is theirs."""
    inject: bool
    """The node may ask for it (and must then remove the event)."""


NOT_STREAMED: Final = UsageRequest(client_asked=False, inject=False)
CLIENT_ASKED: Final = UsageRequest(client_asked=True, inject=False)
NODE_ASKS: Final = UsageRequest(client_asked=False, inject=True)


class Fields(Protocol):
    """A request body's top-level members (a dict, or the node's undecoded Payload)."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def __contains__(self, key: str, /) -> bool: ...


def usage_request(payload: Fields) -> UsageRequest:
    """Non-streamed answers always carry usage. A stream is asked for it unless the client
    already did, set `stream_options` to something that is not an object (the backend will say
    so), or asked for vLLM's `continuous_usage_stats` (usage in every chunk: not ours to add)."""
    if not payload.get("stream"):
        return NOT_STREAMED
    options = payload.get("stream_options")
    if options is None:
        return NODE_ASKS
    if not isinstance(options, dict):
        return NOT_STREAMED
    if options.get("include_usage") is True:
        return CLIENT_ASKED
    if options.get("continuous_usage_stats"):
        return NOT_STREAMED
    return NODE_ASKS


_ASK_USAGE: Final = b'"stream_options":{"include_usage":true},'


def with_usage(body: bytes, payload: Fields) -> bytes:
    """`with_usage_parts`, joined."""
    return b"".join(with_usage_parts(body, payload))


def with_usage_parts(body: bytes, payload: Fields) -> tuple[bytes | memoryview, ...]:
    """`body` (the JSON object `payload` was parsed from, model rewritten as sent) with
    `stream_options.include_usage` set, as pieces to send one after the other. Without
    `stream_options` the field goes in after the opening brace (the node refuses bodies that
    repeat a key, so it is the only one), and the rest of the body is a view: no copy and no
    re-encoding whatever the prompt's size (a 200 KB copy per request cost the node a sixth of
    its CPU under load). Otherwise (`"stream_options": null` too) the body is encoded again,
    other options kept."""
    brace = len(body) - len(body.lstrip(b" \t\r\n")) + 1  # lstrip returns `body` itself
    if "stream_options" not in payload and body[brace - 1 : brace] == b"{":  # UTF-8, no BOM
        return body[:brace], _ASK_USAGE, memoryview(body)[brace:]
    merged = {**(payload.get("stream_options") or {}), "include_usage": True}
    return (json.dumps({**json.loads(body), "stream_options": merged}).encode(),)


class StreamUsage:
    """Watches one relayed SSE stream for its usage event: `feed` each chunk and write what it
    returns, then write `finish()`'s bytes before the end; `raw` is known after `finish`.

    With `strip`, data lines that carry a usage object are removed with the blank line that
    ends their event (the node asked for them, the client did not): the last such line of each
    chunk, searched from the chunk's end (a usage event is the last one before `[DONE]`).
    """

    __slots__ = ("_eat_blank", "_held", "first", "raw", "strip")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.raw: bytes | None = None
        """The last usage object's bytes seen so far (for `decode_usage`)."""
        self.first: bytes | None = None
        """The first usage object's bytes (a stream that splits its usage: `merged_usage`)."""
        self._held = b""
        self._eat_blank = False

    def feed(self, chunk: bytes) -> bytes:
        if self._held:
            chunk = self._held + chunk
            self._held = b""
        if self._eat_blank:
            chunk = self._drop_blank(chunk)
        if not chunk.endswith(b"\n"):
            cut = chunk.rfind(b"\n") + 1
            if len(chunk) - cut <= MAX_HELD:
                chunk, self._held = chunk[:cut], chunk[cut:]
        last = chunk.rfind(_USAGE_KEY)
        if last >= 0:
            chunk = self._inspect(chunk, last)
        return chunk

    def finish(self) -> bytes:
        """What is still held (a last line without its end), looked at like a chunk."""
        held, self._held = self._held, b""
        last = held.rfind(_USAGE_KEY)
        return self._inspect(held, last) if last >= 0 else held

    @property
    def usage(self) -> Usage | None:
        return None if self.raw is None else decode_usage(self.raw)

    def discard(self) -> None:
        """The stream broke: the held partial line is dropped (it can never be completed)."""
        self._held = b""

    def _drop_blank(self, chunk: bytes) -> bytes:
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        elif chunk.startswith(b"\n"):
            chunk = chunk[1:]
        elif chunk in (b"", b"\r"):
            return chunk  # the blank line is still to come
        self._eat_blank = False
        return chunk

    def _inspect(self, chunk: bytes, at: int) -> bytes:
        """`at`: the chunk's last `"usage"`. Keeps the bytes of the chunk's last data line
        with a usage object and, when stripping, removes that line with the blank line after
        it. Only the last: vLLM sends one usage event, last before [DONE] (the node never
        asks with `continuous_usage_stats`), and looking further would scan the whole chunk
        again."""
        while at >= 0:
            m = _USAGE_OBJECT.match(chunk, at)  # None after a backslash: inside a string
            begin = chunk.rfind(b"\n", 0, at) + 1
            if m is not None and chunk.startswith(b"data:", begin):
                break
            at = chunk.rfind(_USAGE_KEY, 0, at)
        else:
            return chunk
        end = chunk.find(b"\n", at) + 1 or len(chunk)
        self.raw = chunk[m.end() - 1 : end]
        if self.first is None:
            self.first = self.raw
        if not self.strip:
            return chunk
        if chunk.startswith(b"\r\n", end):
            end += 2
        elif chunk.startswith(b"\n", end):
            end += 1
        else:
            self._eat_blank = end == len(chunk)  # its blank line comes with the next chunk
        return chunk[:begin] + chunk[end:]
