"""POST /v1/chat/completions and /v1/completions: validate, route, forward.

The key was checked by the middleware. The hot path awaits nothing but the upstream on a cache
hit and logs nothing per request above debug.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from aiohttp import StreamReader, web

from affinity_node.http.errors import ApiError, short
from affinity_node.http.forward import Forwarder
from affinity_node.http.middleware import base_headers
from affinity_node.http.payload import Payload
from affinity_node.http.state import API_KEY_ID, BACKENDS, CONFIG, MODEL, ROUTER, STATUS
from affinity_node.ledger.usage import usage_request, with_usage_parts
from affinity_node.routing.members import conversation_key
from affinity_node.routing.router import NoBackend


async def read_payload(request: web.Request) -> Payload:
    return Payload(await read_body(request))


def _too_large() -> ApiError:
    return ApiError(
        413, "Request body too large.", "invalid_request_error", None, "request_too_large"
    )


async def read_body(request: web.Request) -> bytes:
    """The body, within limits.max_body_bytes. aiohttp's request.read() copies a body twice
    (into a bytearray, then to bytes); this joins the received chunks once, which is a few
    percent of the node's CPU at 200 KB. A declared length over the limit is refused unread.
    A read that has to wait for the client is bounded by limits.client_body_read_timeout_seconds
    (408); reads of bytes already received arm no timer."""
    limits = request.app[CONFIG].limits
    limit = limits.max_body_bytes
    if (request.content_length or 0) > limit:
        raise _too_large()
    content = request.content
    chunks: list[bytes] = []
    size = 0
    while True:
        if content.total_bytes == size and not content.is_eof():  # nothing buffered: waits
            chunk = await _read_waiting(content, limits.client_body_read_timeout_seconds)
        else:
            chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_waiting(content: StreamReader, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await content.readany()
    except TimeoutError:
        raise ApiError(
            408,
            f"The request body stalled: no bytes for {timeout:g} s.",
            "invalid_request_error",
            None,
            "request_timeout",
            headers={"Connection": "close"},
        ) from None


def _check_forwarded_headers(request: web.Request) -> None:
    """Client headers the node passes upstream go out as latin-1 header lines: anything not
    ASCII is refused here, before routing, rather than failing on its way to a backend.
    (x-request-id is replaced instead, in the middleware; x-session-id is only hashed.)"""
    value = request.headers.get("Accept-Encoding")
    if value is not None and not value.isascii():
        raise ApiError(
            400,
            "The Accept-Encoding header must be ASCII.",
            "invalid_request_error",
            None,
            "invalid_header_value",
        )


async def handle_completion(request: web.Request) -> web.StreamResponse:
    app = request.app
    started = time.perf_counter()
    headers = base_headers(request)
    if app[STATUS].draining:
        raise ApiError(
            503,
            "This node is shutting down; retry on another.",
            "service_unavailable",
            None,
            "draining",
            headers={"Retry-After": "1", "Connection": "close"},
        )
    _check_forwarded_headers(request)
    key_id = request[API_KEY_ID]
    payload = await read_payload(request)
    model = app[BACKENDS].canonical(payload.model)
    if model is None:
        raise ApiError(
            404,
            f"The model '{short(payload.model)}' does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    request[MODEL] = model
    conversation = partial(conversation_key, payload, request.headers.get("x-session-id"))
    try:
        route = await app[ROUTER].route(
            key_id, model, affinity_path=True, conversation=conversation
        )
    except NoBackend:
        raise ApiError(
            503,
            f"No healthy backend serves '{model}' right now.",
            "service_unavailable",
            "model",
            "no_healthy_backend",
            headers={"Retry-After": "1"},
        ) from None
    # Backends serve the canonical name: an alias in the request is rewritten, nothing else.
    upstream_body = payload.with_model(model)
    forwarder = Forwarder(request, headers, started)
    usage_body = None
    if payload.stream and forwarder.ledger is not None:
        asks = usage_request(payload)
        forwarder.client_asked_usage = asks.client_asked
        if asks.inject:
            usage_body = with_usage_parts(upstream_body, payload)
    return await forwarder.run(route, key_id, upstream_body, payload.stream, usage_body)
