"""The Responses API as vLLM serves it: request parsing, bodies, SSE events, the store.

Pure (no time, no server state besides the store): responses_routes.py runs the requests on
the backend's generation core. A conversation is flattened to one prompt line per item, in
the same `role: text` form as a chat, so a chain of turns linked by `previous_response_id`
grows one prefix and the prefix cache sees it as a chat resent in full.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from affinity_node.sim.vllm_api import ApiError

_ECHOED = ("temperature", "top_p", "metadata", "user", "prompt_cache_key", "truncation")
"""Request fields a response object repeats as given."""

TOOL_TRIGGER = "call tool"
"""The deterministic rule for a tool-call turn: the last input item is a user message that
contains this (any case) and the request offers a function tool."""


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    items: list[dict[str, Any]]
    """This turn's input as items (a string input becomes one user message)."""
    instructions: str | None
    previous_response_id: str | None
    stream: bool
    store: bool
    background: bool
    max_output_tokens: int | None
    tools: list[dict[str, Any]]
    echo: dict[str, Any]


def _int_or_none(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"{name} must be a positive integer", param=name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be a boolean", param=name)
    return value


def _items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a string or a non-empty list of items", param="input")
    for item in value:
        if not isinstance(item, dict):
            raise ApiError(400, "each input item must be an object", param="input")
        if item.get("type", "message") == "message" and not isinstance(item.get("role"), str):
            raise ApiError(400, "a message item needs a role", param="input")
    return value


def parse_request(body: Any) -> ResponsesRequest:
    """Checks a `POST /v1/responses` body (the model is checked by the caller)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "instructions must be a string", param="instructions")
    previous = body.get("previous_response_id")
    if previous is not None and not isinstance(previous, str):
        raise ApiError(400, "previous_response_id must be a string", param="previous_response_id")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "tools must be a list of objects", param="tools")
    request = ResponsesRequest(
        model=model,
        items=_items(body.get("input")),
        instructions=instructions,
        previous_response_id=previous,
        stream=_bool(body, "stream", False),
        store=_bool(body, "store", True),
        background=_bool(body, "background", False),
        max_output_tokens=_int_or_none(body, "max_output_tokens"),
        tools=tools,
        echo={name: body[name] for name in _ECHOED if name in body},
    )
    if request.background and not request.store:
        raise ApiError(400, "background responses need store=true", param="background")
    if request.background and request.stream:
        raise ApiError(400, "the simulator does not stream background responses", param="stream")
    request.echo.setdefault("tool_choice", body.get("tool_choice") or "auto")
    request.echo.setdefault("parallel_tool_calls", body.get("parallel_tool_calls", True))
    return request


# -- the prompt ------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def render_item(item: dict[str, Any]) -> str:
    """One prompt line per item, as a chat would put it (`role: text`)."""
    kind = item.get("type", "message")
    if kind == "message":
        return f"{item.get('role')}: {_content_text(item.get('content'))}\n"
    if kind == "function_call":
        return f"assistant: {item.get('name')}({item.get('arguments')}) [{item.get('call_id')}]\n"
    if kind == "function_call_output":
        return f"tool: {_content_text(item.get('output'))} [{item.get('call_id')}]\n"
    return f"{kind}: {json.dumps(item, sort_keys=True)}\n"


def prompt_text(instructions: str | None, items: Sequence[dict[str, Any]]) -> str:
    head = f"system: {instructions}\n" if instructions else ""
    return head + "".join(render_item(item) for item in items)


def tool_to_call(request: ResponsesRequest) -> dict[str, Any] | None:
    """The function tool this turn calls, by the rule of TOOL_TRIGGER, else None."""
    last = request.items[-1]
    if last.get("type", "message") != "message" or last.get("role") != "user":
        return None
    if TOOL_TRIGGER not in _content_text(last.get("content")).lower():
        return None
    return next((t for t in request.tools if t.get("type") == "function" and t.get("name")), None)


# -- bodies ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + output_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [part] if status == "completed" else [],
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_object(
    request: ResponsesRequest,
    response_id: str,
    status: str,
    output: list[dict[str, Any]],
    usage_: dict[str, Any] | None,
    created_at: int | None = None,
) -> dict[str, Any]:
    """A whole response object in OpenAI's shape."""
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "max_output_tokens"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at if created_at is not None else int(time.time()),
        "model": request.model,
        "status": status,
        "background": request.background,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "output": output,
        "previous_response_id": request.previous_response_id,
        "reasoning": None,
        "store": request.store,
        "text": {"format": {"type": "text"}},
        "tools": request.tools,
        "usage": usage_,
        **{"temperature": None, "top_p": None, "metadata": {}, "truncation": "disabled"},
        **request.echo,
    }


def text_events(
    item_id: str, tokens: Sequence[str]
) -> list[tuple[int | None, str, dict[str, Any]]]:
    """The events of one message output item between `added` and `done`."""
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    text = "".join(tokens)
    events: list[tuple[int | None, str, dict[str, Any]]] = [
        (None, "response.content_part.added", {**where, "part": empty}),
    ]
    events.extend(
        (i, "response.output_text.delta", {**where, "delta": t, "logprobs": []})
        for i, t in enumerate(tokens)
    )
    events.append((None, "response.output_text.done", {**where, "text": text, "logprobs": []}))
    events.append((None, "response.content_part.done", {**where, "part": {**empty, "text": text}}))
    return events


def call_events(
    item_id: str, name: str, pieces: Sequence[str]
) -> list[tuple[int | None, str, dict[str, Any]]]:
    """The events of one function_call output item between `added` and `done`."""
    where = {"item_id": item_id, "output_index": 0}
    events: list[tuple[int | None, str, dict[str, Any]]] = [
        (i, "response.function_call_arguments.delta", {**where, "delta": p})
        for i, p in enumerate(pieces)
    ]
    done = {**where, "arguments": "".join(pieces), "name": name}
    events.append((None, "response.function_call_arguments.done", done))
    return events


def arguments_pieces(tokens: Sequence[str]) -> list[str]:
    """A call's JSON arguments, one piece per output token (JSON escapes char by char, so
    the pieces join into the escaped whole)."""
    pieces = [json.dumps(t)[1:-1] for t in tokens]
    pieces[0] = '{"query": "' + pieces[0]
    pieces[-1] += '"}'
    return pieces


# -- the store -------------------------------------------------------------------------------


@dataclass
class Stored:
    body: dict[str, Any]
    conversation: list[dict[str, Any]] | None = None
    """Every item up to and including this response's output, once it is done."""
    task: Any = field(default=None, repr=False)
    """The asyncio task of a background response still running."""


class ResponseStore:
    """Responses kept in memory by the server that made them, least recently used out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: Stored) -> None:
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def running_tasks(self) -> list[Any]:
        return [s.task for s in self._items.values() if s.task is not None]


def not_found(response_id: str, param: str) -> ApiError:
    return ApiError(
        404,
        f"Response with id '{response_id}' not found.",
        param=param,
        code="response_not_found",
    )
