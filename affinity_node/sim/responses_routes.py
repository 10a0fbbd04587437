"""`/v1/responses` on the simulator: create (stream, non-stream, background), get, cancel.

Responses are stored in memory by the server that made them, as vLLM does: a request naming
`previous_response_id` is answered only there (elsewhere 404 `response_not_found`), and the
stored conversation is put before the new input, so each turn's prompt is the whole growing
context and the prefix cache serves the part it has seen.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from affinity_node.sim.responses_api import (
    ResponsesRequest,
    ResponseStore,
    Stored,
    arguments_pieces,
    call_events,
    function_call_item,
    message_item,
    new_id,
    not_found,
    parse_request,
    prompt_text,
    response_object,
    text_events,
    tool_to_call,
    usage,
)
from affinity_node.sim.vllm_api import ApiError, Event, sse

if TYPE_CHECKING:
    from affinity_node.sim.fake_backend import FakeBackend, Generation


@dataclass
class Turn:
    """One `POST /v1/responses` on its way through the generation core."""

    request: ResponsesRequest
    conversation: list[dict[str, Any]]
    """The stored history followed by this turn's input."""
    tool: dict[str, Any] | None
    response_id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def prompt(self) -> str:
        return prompt_text(self.request.instructions, self.conversation)

    def body(
        self, status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None
    ) -> dict[str, Any]:
        return response_object(
            self.request, self.response_id, status, output, usage_, self.created_at
        )


class ResponsesRoutes:
    """The handlers and the store of one backend."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.store = ResponseStore(backend.cfg.response_store_size)

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self.create)
        app.router.add_get("/v1/responses/{response_id}", self.get)
        app.router.add_post("/v1/responses/{response_id}/cancel", self.cancel)
        app.on_cleanup.append(self._stop_background)

    async def create(self, request: web.Request) -> web.StreamResponse:
        arrival = time.monotonic()
        try:
            req = parse_request(await self.backend.read_body(request))
            self.backend.check_model(req.model)
            turn = Turn(req, self._history(req) + req.items, tool_to_call(req))
        except ApiError as exc:
            return exc.response()
        if req.background:
            return self._start_background(turn, arrival)
        return await self.backend.guarded(self._run(request, turn, arrival))

    async def get(self, request: web.Request) -> web.Response:
        response_id = request.match_info["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            return not_found(response_id, "response_id").response()
        return web.json_response(stored.body)

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancels a background response still queued or running (vLLM: only those)."""
        response_id = request.match_info["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            return not_found(response_id, "response_id").response()
        if stored.task is None:
            error = ApiError(400, "Cannot cancel a synchronous response.", param="response_id")
            return error.response()
        stored.task.cancel()
        stored.task = None
        stored.body = {**stored.body, "status": "cancelled"}
        return web.json_response(stored.body)

    # -- running a turn --------------------------------------------------------------------

    def _history(self, req: ResponsesRequest) -> list[dict[str, Any]]:
        if req.previous_response_id is None:
            return []
        stored = self.store.get(req.previous_response_id)
        if stored is None:
            raise not_found(req.previous_response_id, "previous_response_id")
        if stored.conversation is None:
            raise ApiError(
                400,
                f"Response with id '{req.previous_response_id}' has not completed.",
                param="previous_response_id",
            )
        return stored.conversation

    def _output(self, turn: Turn, gen: Generation) -> list[dict[str, Any]]:
        if turn.tool is None:
            return [message_item(new_id("msg"), gen.text)]
        arguments = "".join(arguments_pieces(gen.tokens))
        return [function_call_item(new_id("fc"), new_id("call"), turn.tool["name"], arguments)]

    def _final(self, turn: Turn, gen: Generation, output: list[dict[str, Any]]) -> dict[str, Any]:
        status = "incomplete" if gen.finish == "length" else "completed"
        return turn.body(
            status, output, usage(gen.prompt_tokens, gen.cached_tokens, len(gen.tokens))
        )

    def _keep(self, turn: Turn, final: dict[str, Any]) -> None:
        if turn.request.store:
            self.store.put(turn.response_id, Stored(final, turn.conversation + final["output"]))

    async def _run(self, request: web.Request, turn: Turn, arrival: float) -> web.StreamResponse:
        req = turn.request
        async with self.backend.generating(
            req.model, turn.prompt, req.max_output_tokens, arrival
        ) as gen:
            final = self._final(turn, gen, self._output(turn, gen))
            if req.stream:
                events = self._events(turn, gen, final)
                return await self.backend.send_events(
                    request, gen, events, on_complete=lambda: self._keep(turn, final)
                )
            if await self.backend.finish_whole(request, gen):
                self._keep(turn, final)
            return web.json_response(final)

    def _events(self, turn: Turn, gen: Generation, final: dict[str, Any]) -> list[Event]:
        item = final["output"][0]
        if item["type"] == "function_call":
            pending = {**item, "arguments": "", "status": "in_progress"}
            middle = call_events(item["id"], item["name"], arguments_pieces(gen.tokens))
        else:
            pending = message_item(item["id"], "", status="in_progress")
            middle = text_events(item["id"], gen.tokens)
        started = turn.body("in_progress", [], None)
        named: list[tuple[int | None, str, dict[str, Any]]] = [
            (None, "response.created", {"response": started}),
            (None, "response.in_progress", {"response": started}),
            (None, "response.output_item.added", {"output_index": 0, "item": pending}),
            *middle,
            (None, "response.output_item.done", {"output_index": 0, "item": item}),
            (None, "response.completed", {"response": final}),
        ]
        return [
            (index, sse({"type": name, "sequence_number": seq, **data}, event=name))
            for seq, (index, name, data) in enumerate(named)
        ]

    # -- background ------------------------------------------------------------------------

    def _start_background(self, turn: Turn, arrival: float) -> web.Response:
        stored = Stored(turn.body("queued", [], None))
        self.store.put(turn.response_id, stored)
        stored.task = asyncio.create_task(self._run_background(turn, stored, arrival))
        return web.json_response(stored.body)

    async def _run_background(self, turn: Turn, stored: Stored, arrival: float) -> None:
        req = turn.request
        try:
            async with self.backend.generating(
                req.model, turn.prompt, req.max_output_tokens, arrival
            ) as gen:
                stored.body = {**stored.body, "status": "in_progress"}
                final = self._final(turn, gen, self._output(turn, gen))
                await self.backend.finish_whole(None, gen)
            stored.body, stored.conversation = final, turn.conversation + final["output"]
        except Exception as exc:  # a failed background response says so, as OpenAI's do
            error = {"code": "server_error", "message": str(exc)}
            stored.body = {**stored.body, "status": "failed", "error": error}
        finally:
            stored.task = None

    async def _stop_background(self, app: web.Application) -> None:
        tasks = self.store.running_tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
