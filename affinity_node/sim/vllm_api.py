"""vLLM's OpenAI-compatible surface as the simulator speaks it: request parsing with
OpenAI error bodies, and the response bodies and SSE events of a completion.

Kept apart from the server (fake_backend.py) and its capacity model (capacity.py) so that each
stays readable; nothing here knows about time or state.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

Kind = Literal["chat", "completion"]

PAD_FIELD = "sim_pad_bytes"
"""Simulator-only body field: a non-streamed answer's text gets this many more bytes (no
decode time, usage unchanged), so proxies can be tested with large answers cheaply."""
MAX_PAD_BYTES = 64 * 1024 * 1024

Event = tuple[int | None, bytes]
"""An SSE event as sent: (output token index to pace it by, or None; its bytes)."""


class ApiError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return web.json_response(body, status=self.status)


def injected_error(status: int) -> ApiError:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return ApiError(status, f"injected failure (status {status})", kind=kind, code="injected")


@dataclass(frozen=True)
class Job:
    """A parsed completion request."""

    kind: Kind
    model: str
    prompt: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    pad_bytes: int = 0
    """`sim_pad_bytes`: padding appended to a non-streamed answer's text."""


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
        return "".join(parts)
    raise ApiError(400, "message content must be a string or a list of parts", param="messages")


def chat_prompt(messages: Any) -> str:
    """A chat flattened to `role: text` lines (every API of the simulator does the same)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    lines = []
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, "each message must be an object", param="messages")
        role = message.get("role")
        lines.append(f"{role}: {_message_text(message.get('content'))}\n")
    return "".join(lines)


def _prompt_text(kind: Kind, body: dict[str, Any]) -> str:
    if kind == "chat":
        return chat_prompt(body.get("messages"))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(p, int) for p in prompt):
            return " ".join(str(p) for p in prompt)  # token ids stand for themselves
    raise ApiError(400, "prompt must be a string or a list of strings or token ids", param="prompt")


def parse_job(kind: Kind, body: Any, models: Sequence[str]) -> Job:
    """Validates a request body as vLLM would, for the parts the simulator uses."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required", param="model")
    if model not in models:
        raise ApiError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    pad = body.get(PAD_FIELD, 0)
    if not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad <= MAX_PAD_BYTES:
        raise ApiError(
            400, f"{PAD_FIELD} must be an integer from 0 to {MAX_PAD_BYTES}", param=PAD_FIELD
        )
    text = _prompt_text(kind, body)
    return Job(kind, model, text, stream, include_usage, max_tokens, pad)


# -- response bodies ------------------------------------------------------------------------


def envelope(job: Job, id_: str, chunk: bool, fingerprint: str) -> dict[str, Any]:
    if job.kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {
        "id": id_,
        "object": obj,
        "created": int(time.time()),
        "model": job.model,
        "system_fingerprint": fingerprint,
    }


def new_id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex


def full_body(
    job: Job, text: str, finish: str, usage: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """A non-streamed answer."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
    if job.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**envelope(job, new_id(job), False, fingerprint), "choices": [choice], "usage": usage}


def stream_events(
    job: Job, tokens: list[str], finish: str, usage: dict[str, Any], fingerprint: str
) -> list[tuple[int | None, dict[str, Any]]]:
    """The SSE events as (output token index to pace by, or None, event body)."""
    id_ = new_id(job)

    def event(
        token_index: int | None, piece: str | None, finish_reason: str | None
    ) -> tuple[int | None, dict[str, Any]]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if job.kind == "chat":
            choice["delta"] = {} if piece is None else {"content": piece}
        else:
            choice["text"] = piece or ""
        return token_index, {**envelope(job, id_, True, fingerprint), "choices": [choice]}

    events = []
    if job.kind == "chat":
        first = event(None, "", None)
        first[1]["choices"][0]["delta"]["role"] = "assistant"
        events.append(first)
    events.extend(event(i, t, None) for i, t in enumerate(tokens))
    events.append(event(None, None, finish))
    if job.include_usage:
        events.append(
            (None, {**envelope(job, id_, True, fingerprint), "choices": [], "usage": usage})
        )
    return events


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE event; Responses and Messages name theirs, chat completions do not."""
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
