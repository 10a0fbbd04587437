"""Anthropic's Messages API on the simulator (`/v1/messages`, `/v1/messages/count_tokens`).

vLLM serves it for clients built on the `anthropic` SDK, which sends the key as `x-api-key`,
reads named SSE events and expects errors as `{"type": "error", "error": {...}}`. Usage
follows Anthropic's meaning: `input_tokens` are the prompt tokens not read from the cache,
`cache_read_input_tokens` the ones that were (their sum is the whole prompt).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from affinity_node.sim.prefix_cache import tokenize
from affinity_node.sim.vllm_api import ApiError, Event, sse

if TYPE_CHECKING:
    from affinity_node.sim.fake_backend import FakeBackend, Generation

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def error_response(exc: ApiError) -> web.Response:
    """An ApiError in Anthropic's error shape, same status."""
    kind = _ERROR_TYPES.get(
        exc.status, "api_error" if exc.status >= 500 else "invalid_request_error"
    )
    body = {"type": "error", "error": {"type": kind, "message": exc.message}}
    return web.json_response(body, status=exc.status)


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    prompt: str
    max_tokens: int
    stream: bool


def _block_text(block: Any) -> str:
    if not isinstance(block, dict):
        raise ApiError(400, "each content block must be an object", param="messages")
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "tool_use":
        return f"{block.get('name')}({block.get('input')})"
    if kind == "tool_result":
        return _content_text(block.get("content"))
    return f"[{kind}]"


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_block_text(block) for block in content)
    raise ApiError(400, "content must be a string or a list of blocks", param="messages")


def prompt_of(body: dict[str, Any]) -> str:
    """The conversation as a chat would flatten it (`role: text` lines, system first)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    system = _content_text(body.get("system"))
    lines = [f"system: {system}\n"] if system else []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError(400, "each message needs role user or assistant", param="messages")
        lines.append(f"{message['role']}: {_content_text(message.get('content'))}\n")
    return "".join(lines)


def parse_request(body: Any, count_only: bool = False) -> MessagesRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required", param="model")
    max_tokens = body.get("max_tokens", 1 if count_only else None)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, "max_tokens: a positive integer is required", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", param="stream")
    return MessagesRequest(model, prompt_of(body), max_tokens, stream)


def usage(gen: Generation, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": gen.prompt_tokens - gen.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": gen.cached_tokens,
        "output_tokens": output_tokens,
    }


def message_body(message_id: str, gen: Generation, text: str | None) -> dict[str, Any]:
    """A whole message (`text` None: the opening of a stream, no content yet)."""
    done = text is not None
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": gen.model,
        "content": [{"type": "text", "text": text}] if done else [],
        "stop_reason": _STOP_REASONS.get(gen.finish, "end_turn") if done else None,
        "stop_sequence": None,
        "usage": usage(gen, len(gen.tokens) if done else 1),
    }


def stream_events(message_id: str, gen: Generation) -> list[Event]:
    """message_start, one text block's start/deltas/stop, message_delta (usage), stop."""
    block = {"index": 0}
    named: list[tuple[int | None, str, dict[str, Any]]] = [
        (None, "message_start", {"message": message_body(message_id, gen, None)}),
        (None, "content_block_start", {**block, "content_block": {"type": "text", "text": ""}}),
        (None, "ping", {}),
    ]
    named.extend(
        (i, "content_block_delta", {**block, "delta": {"type": "text_delta", "text": t}})
        for i, t in enumerate(gen.tokens)
    )
    delta = {"stop_reason": _STOP_REASONS.get(gen.finish, "end_turn"), "stop_sequence": None}
    named += [
        (None, "content_block_stop", block),
        (None, "message_delta", {"delta": delta, "usage": usage(gen, len(gen.tokens))}),
        (None, "message_stop", {}),
    ]
    return [(index, sse({"type": name, **data}, event=name)) for index, name, data in named]


class MessagesRoutes:
    """The handlers of one backend; every error in Anthropic's shape."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.create)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    async def create(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        try:
            req = parse_request(await self.backend.read_body(request))
            self.backend.check_model(req.model)
        except ApiError as exc:
            return error_response(exc)
        return await self.backend.guarded(self._run(request, req, arrival))

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            req = parse_request(await self.backend.read_body(request), count_only=True)
            self.backend.check_model(req.model)
        except ApiError as exc:
            return error_response(exc)
        return web.json_response({"input_tokens": len(tokenize(req.prompt))})

    async def _run(
        self, request: web.Request, req: MessagesRequest, arrival: float
    ) -> web.StreamResponse:
        message_id = f"msg_{uuid.uuid4().hex}"
        async with self.backend.generating(req.model, req.prompt, req.max_tokens, arrival) as gen:
            if req.stream:
                events = stream_events(message_id, gen)
                return await self.backend.send_events(request, gen, events)
            await self.backend.finish_whole(request, gen)
            return web.json_response(message_body(message_id, gen, gen.text))
