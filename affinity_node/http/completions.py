"""POST /v1/chat/completions and /v1/completions: validate, route, forward.

The key was checked by the middleware. The hot path awaits nothing but the upstream on a cache
hit and logs nothing per request above debug.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

from aiohttp import web

from affinity_node.http.errors import ApiError, short
from affinity_node.http.forward import Forwarder
from affinity_node.http.middleware import base_headers
from affinity_node.http.state import API_KEY_ID, BACKENDS, MODEL, ROUTER, STATUS
from affinity_node.ledger.usage import usage_request, with_usage
from affinity_node.routing.members import conversation_key
from affinity_node.routing.router import NoBackend

MAX_MODEL_LEN = 256


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects with a key twice are refused: parsers disagree on which one wins, so the
    proxy and the backend could read different models from one body."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


async def read_payload(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, "Request body too large.", "invalid_request_error", None, "request_too_large"
        ) from None
    try:
        payload = json.loads(body, object_pairs_hook=_object)
    except _DuplicateKey:
        raise ApiError(
            400,
            "A JSON object in the body repeats a key.",
            "invalid_request_error",
            None,
            "invalid_json",
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack (100,000 `[`).
        raise ApiError(
            400, "The body is not valid JSON.", "invalid_request_error", None, "invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The body must be a JSON object.", "invalid_request_error")
    model = payload.get("model")
    if model is None:
        raise ApiError(
            400,
            "Missing required parameter: 'model'.",
            "invalid_request_error",
            "model",
            "missing_required_parameter",
        )
    if not isinstance(model, str) or not model:
        raise ApiError(
            400,
            "'model' must be a non-empty string.",
            "invalid_request_error",
            "model",
            "invalid_type",
        )
    if len(model) > MAX_MODEL_LEN:
        raise ApiError(
            400,
            f"'model' is longer than {MAX_MODEL_LEN} characters.",
            "invalid_request_error",
            "model",
            "invalid_value",
        )
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(
            400, "'stream' must be a boolean.", "invalid_request_error", "stream", "invalid_type"
        )
    return body, payload


def canonical_body(body: bytes, payload: dict[str, Any], canonical: str) -> bytes:
    """Backends serve the canonical name; an alias in the request is rewritten."""
    if payload["model"] == canonical:
        return body
    payload = {**payload, "model": canonical}
    return json.dumps(payload).encode()


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
    key_id = request[API_KEY_ID]
    body, payload = await read_payload(request)
    model = app[BACKENDS].canonical(payload["model"])
    if model is None:
        raise ApiError(
            404,
            f"The model '{short(payload['model'])}' does not exist.",
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
    upstream_body = canonical_body(body, payload, model)
    stream = bool(payload.get("stream"))
    forwarder = Forwarder(request, headers, started)
    usage_body = None
    if stream and forwarder.ledger is not None:
        asks = usage_request(payload)
        forwarder.client_asked_usage = asks.client_asked
        if asks.inject:
            usage_body = with_usage(upstream_body, payload)
    return await forwarder.run(route, key_id, model, upstream_body, stream, usage_body)
