"""Reading `usage` from the answers the node forwards, without slowing the relay.

vLLM reports per answer how many prompt tokens came from its prefix cache:
`usage.prompt_tokens_details.cached_tokens`, in a non-streamed body and, for a stream, in one
extra event before `data: [DONE]` when the request set `stream_options.include_usage`.

- A non-streamed body is not parsed whole: the last `"usage"` key is found from the end and
  only its object is decoded (vLLM and OpenAI put it after the choices).
- A stream is relayed as it arrives. Per chunk the watcher does a substring search and, when a
  chunk ends inside a line, holds that partial line back until its end arrives (the client
  could not use it before). JSON is decoded once, at the end, for the last usage event only.
- When the client did not ask for usage, the node asks the backend for it (`usage_body`) and
  the watcher removes that event, so the client gets the stream it would get from vLLM
  directly. Only vllm backends are asked: other servers may reject the field or add
  `"usage": null` to every chunk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

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


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one answer, as the backend reported them."""

    prompt: int
    cached: int
    completion: int


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return min(value, MAX_TOKENS)


def usage_of(obj: Any) -> Usage | None:
    """A `usage` object -> Usage; None unless it has a usable `prompt_tokens`. Missing
    details mean no cached tokens; cached tokens never exceed the prompt."""
    if not isinstance(obj, dict):
        return None
    prompt = _count(obj.get("prompt_tokens"))
    if prompt is None:
        return None
    details = obj.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    completion = _count(obj.get("completion_tokens"))
    return Usage(prompt, min(cached or 0, prompt), completion or 0)


def _decode_usage_at(data: bytes, start: int) -> Usage | None:
    """The usage object whose `{` is at `start`."""
    text = data[start : start + _USAGE_SPAN].decode("utf-8", "replace")
    try:
        obj, _end = _DECODER.raw_decode(text)
    except ValueError:
        return None
    return usage_of(obj)


def usage_from_body(data: bytes) -> Usage | None:
    """The top-level usage of a non-streamed answer, read from the end of the body."""
    end = len(data)
    while True:
        i = data.rfind(_USAGE_KEY, 0, end)
        if i < 0:
            return None
        m = _USAGE_OBJECT.match(data, i)  # None after a backslash: inside a string
        if m is not None:
            return _decode_usage_at(data, m.end() - 1)
        end = i  # inside a string (escaped quote) or not an object: look further back


@dataclass(frozen=True, slots=True)
class UsageRequest:
    """What a streamed request asks about usage, and what the node adds."""

    client_asked: bool
    """The client set `stream_options.include_usage`: the usage event is theirs."""
    inject: bool
    """The node may ask for it (and must then remove the event)."""


NOT_STREAMED: Final = UsageRequest(client_asked=False, inject=False)


def usage_request(payload: dict[str, Any]) -> UsageRequest:
    """Non-streamed answers always carry usage. A stream is asked for it unless the client
    already did, set `stream_options` to something that is not an object (the backend will say
    so), or asked for vLLM's `continuous_usage_stats` (usage in every chunk: not ours to add)."""
    if not payload.get("stream"):
        return NOT_STREAMED
    options = payload.get("stream_options")
    if options is None:
        return UsageRequest(client_asked=False, inject=True)
    if not isinstance(options, dict):
        return NOT_STREAMED
    if options.get("include_usage") is True:
        return UsageRequest(client_asked=True, inject=False)
    if options.get("continuous_usage_stats"):
        return NOT_STREAMED
    return UsageRequest(client_asked=False, inject=True)


def with_usage(payload: dict[str, Any]) -> bytes:
    """The request body with `stream_options.include_usage` set (other options kept)."""
    options = payload.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps({**payload, "stream_options": merged}).encode()


class StreamUsage:
    """Watches one relayed SSE stream for its usage event: `feed` each chunk and write what it
    returns, then write `finish()`'s bytes before the end; `usage` is known after `finish`.

    With `strip`, data lines that carry a usage object are removed with the blank line that
    ends their event (the node asked for them, the client did not).
    """

    __slots__ = ("_eat_blank", "_held", "_last", "strip", "usage")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self._held = b""
        self._last: bytes | None = None
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
        if _USAGE_KEY in chunk:
            chunk = self._inspect(chunk)
        return chunk

    def finish(self) -> bytes:
        """What is still held (a last line without its end); decodes the last usage seen."""
        held, self._held = self._held, b""
        if _USAGE_KEY in held:
            held = self._inspect(held)
        if self._last is not None:
            m = _USAGE_OBJECT.search(self._last)
            if m is not None:
                self.usage = _decode_usage_at(self._last, m.end() - 1)
        return held

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

    def _inspect(self, chunk: bytes) -> bytes:
        """Remembers the chunk's last data line with a usage object; removes such lines (and
        the blank line after each) when stripping. Runs once per stream, normally."""
        if _USAGE_OBJECT.search(chunk) is None:
            return chunk
        lines = chunk.splitlines(keepends=True)
        kept: list[bytes] = []
        eat_blank = False
        for line in lines:
            if eat_blank:
                eat_blank = False
                if line in (b"\n", b"\r\n"):
                    continue
            if line.startswith(b"data:") and _USAGE_OBJECT.search(line) is not None:
                self._last = line
                if self.strip:
                    eat_blank = True
                    continue
            kept.append(line)
        self._eat_blank = eat_blank
        return b"".join(kept)
