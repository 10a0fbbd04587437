"""The wire-format side of usage accounting: finding `usage` in the bytes the node relays,
and asking the backend for it, without slowing the relay (the ledger decodes what is found
later: ledger/usage.py).

- A non-streamed body is searched from its end for the last `"usage"` key (vLLM and OpenAI put
  it after the choices); its bytes are copied, not decoded (`usage_span`).
- A stream is relayed as it arrives. Per chunk the watcher does a substring search and, when a
  chunk ends inside a line, holds that partial line back until its end arrives (the client
  could not use it before). Only a line with a usage object is looked at more closely.
- When the client did not ask for usage, the node asks the backend for it (`with_usage`) and
  the watcher removes that event, so the client gets the stream it would get from vLLM
  directly. Only vllm and llamacpp backends are asked (both answer with one final usage
  event): other servers may reject the field or add `"usage": null` to every chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

from affinity_node.ledger.usage import USAGE_SPAN, Usage, decode_usage

_USAGE_KEY: Final = b'"usage"'
_USAGE_OBJECT: Final = re.compile(rb'(?<!\\)"usage"\s*:\s*\{')
MAX_HELD: Final = 65536
"""A partial line longer than this is relayed as it is (no usage event is that long)."""


def usage_span(data: bytes) -> bytes | None:
    """The bytes of a non-streamed answer's top-level usage object (from its `{`, at most
    `USAGE_SPAN` of them), found from the end of the body; None when it has none."""
    end = len(data)
    while True:
        i = data.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return None
        m = _USAGE_OBJECT.match(data, i)  # None after a backslash: inside a string
        if m is not None:
            start = m.end() - 1
            return data[start : start + USAGE_SPAN]
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
