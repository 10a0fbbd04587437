"""The proxied API (http/endpoints.py): validate, route, forward, for every endpoint alike.

The key was checked by the route wrapper. The hot path (a chat request hitting its binding)
awaits nothing but the upstream and logs nothing per request above debug.
"""

from __future__ import annotations

import math
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any

from aiohttp import web

from affinity_node.auth.limits import Refused, Ticket
from affinity_node.http.body import check_forwarded_headers, read_body
from affinity_node.http.endpoints import Endpoint
from affinity_node.http.errors import ApiError, short
from affinity_node.http.forward import Forwarder, Outgoing
from affinity_node.http.multipart import form_model
from affinity_node.http.payload import Payload
from affinity_node.http.response_ids import StoredId, read_id, untag
from affinity_node.http.state import API, API_KEY_ID, MODEL, REQUEST_ID, ApiState, Relay
from affinity_node.http.usage_wire import usage_request, with_usage_parts
from affinity_node.http.wrapper import Handler, base_headers
from affinity_node.ledger.usage import decode_usage
from affinity_node.observability.tracing import traced
from affinity_node.routing.backends import Backend
from affinity_node.routing.fairq import FairQueue, QueueRefused
from affinity_node.routing.members import conversation_key, first_turn
from affinity_node.routing.router import NoBackend, OwnerGone, Route


def handler(endpoint: Endpoint) -> Handler:
    """The request handler of one endpoint: `_serve` itself, not a coroutine around it (a
    frame more is resumed at every await of the request)."""
    return partial(_serve, endpoint=endpoint)


def _draining() -> ApiError:
    return ApiError(
        503,
        "This node is shutting down; retry on another.",
        "service_unavailable",
        None,
        "draining",
        headers={"Retry-After": "1", "Connection": "close"},
    )


def _schema_behind() -> ApiError:
    return ApiError(
        503,
        "This node waits for a database migration; retry shortly.",
        "service_unavailable",
        None,
        "schema_behind",
        headers={"Retry-After": "5"},
    )


def _unknown_model(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{short(model)}' does not exist.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def _no_backend(model: str) -> ApiError:
    return ApiError(
        503,
        f"No healthy backend serves '{model}' right now.",
        "service_unavailable",
        "model",
        "no_healthy_backend",
        headers={"Retry-After": "1"},
    )


def _not_stored(client_id: str, param: str | None, gone: bool = False) -> ApiError:
    """A stored response this node cannot reach: never tagged for this key (not found), or
    its owner left the fleet or is down (no longer available: no other backend has it)."""
    if gone:
        message = (
            f"The stored response '{short(client_id)}' is no longer available: the backend "
            "that made it has left the fleet or is down."
        )
    else:
        message = f"Response with id '{short(client_id)}' not found."
    return ApiError(404, message, "invalid_request_error", param, "response_not_found")


async def _serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    api = request.app[API]
    relay = api.relay
    started = time.perf_counter()
    headers = base_headers(request[REQUEST_ID], api.node_id)
    status = api.status
    if status.draining:
        raise _draining()
    if status.schema_behind:
        raise _schema_behind()
    check_forwarded_headers(request)
    key_id = request[API_KEY_ID]
    body = await read_body(request, relay.limits)
    out = Outgoing(
        body,
        False,
        request.path,
        request.method,
        record=endpoint.ledger,
        tag_ids=endpoint.stored != "none",
        client_asked_usage=not endpoint.injects_usage,
        merge_usage=endpoint.merges_usage,
        errors=endpoint.errors,
    )
    try:
        if endpoint.stored == "names":
            route = _to_owner(request, api, key_id, out)
        else:
            try:
                if endpoint.body == "multipart":
                    route = await _multipart(request, api, key_id, out)
                else:
                    route = await _json(request, api, endpoint, key_id, out)
            except NoBackend:  # out.model is set before any routing
                raise _no_backend(out.model) from None
    except BaseException:
        if out.ticket is not None:  # admitted, then not routable: the slot and tokens back
            api.limiter.finish(out.ticket, 0)
        raise
    forwarder = Forwarder(relay, request, headers, started)
    try:
        if out.ticket is None:
            return await forwarder.run(route, key_id, out)
        return await _limited(api, headers, forwarder, route, key_id, out, out.ticket)
    finally:
        fairq = api.fairq
        if fairq.busy:  # something saturates: this request's end may release a queued one
            _fair_done(fairq, route.model, key_id, out, forwarder)


def _fair_done(
    fairq: FairQueue, model: str, key_id: Any, out: Outgoing, forwarder: Forwarder
) -> None:
    """A request that did not queue counts its tokens as its tenant's service; any end frees
    room for the next queued request."""
    if out.queued:
        fairq.release(model)
        return
    used = None if forwarder.usage is None else decode_usage(forwarder.usage)
    tokens = len(out.body) // 4 if used is None else used.prompt + used.completion
    fairq.served(model, key_id, tokens)


async def _limited(
    api: ApiState,
    headers: dict[str, str],
    forwarder: Forwarder,
    route: Route,
    key_id: Any,
    out: Outgoing,
    ticket: Ticket,
) -> web.StreamResponse:
    """A limited key's request: its x-ratelimit-* headers, and its charge settled from the
    answer's usage once done (the slot freed however it ended)."""
    headers.update(ticket.headers)
    try:
        return await forwarder.run(route, key_id, out)
    finally:
        used = None if forwarder.usage is None else decode_usage(forwarder.usage)
        tokens = None if used is None else used.prompt + used.completion
        api.limiter.finish(ticket, tokens)


DEFAULT_MAX_TOKENS = 256
"""The answer's size charged up front when the request bounds none (usage corrects it)."""


def _admit(api: ApiState, key_id: Any, model: str, out: Outgoing, estimate: int) -> None:
    """Before routing: a limited key's request is charged or refused (429) from memory."""
    limiter = api.limiter
    scopes = limiter.of(key_id)
    if scopes is None:
        return
    try:
        out.ticket = limiter.admit(scopes, model, estimate)
    except Refused as refused:
        raise _rate_limited(refused) from None


def _rate_limited(refused: Refused) -> ApiError:
    what = {"rpm": "requests per minute (RPM)", "tpm": "tokens per minute (TPM)"}.get(
        refused.kind, "concurrent requests"
    )
    return ApiError(
        429,
        f"Rate limit reached for {what}: limit {refused.limit}. "
        f"Please try again in {refused.retry_after_s:.3g}s.",
        "tokens" if refused.kind == "tpm" else "requests",
        None,
        "rate_limit_exceeded",
        headers=refused.headers,
    )


def _estimate(payload: Payload, body: bytes) -> int:
    """Tokens charged up front: prompt bytes / 4 and the answer's bound."""
    bound = DEFAULT_MAX_TOKENS
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(name)
        if type(value) is int and value >= 0:
            bound = value
            break
    return len(body) // 4 + bound


def _json(
    request: web.Request, api: ApiState, endpoint: Endpoint, key_id: Any, out: Outgoing
) -> Coroutine[Any, Any, Route]:
    """Reads what routing needs from the body; returns the routing to await (NoBackend
    escapes it, as from `_multipart`). Not a coroutine itself: the request's hot path resumes
    one frame fewer at every await."""
    relay = api.relay
    payload = Payload(out.body)
    model = relay.backends.canonical(payload.model)
    if model is None:
        raise _unknown_model(payload.model)
    _set_model(request, relay, out, model)
    out.stream = payload.stream
    # Backends serve the canonical name: an alias in the request is rewritten, nothing else.
    out.body = payload.with_model(model)
    if api.limiter.of(key_id) is not None:
        _admit(api, key_id, model, out, _estimate(payload, out.body))
    if endpoint.stored == "creates":
        previous = payload.get("previous_response_id")
        if isinstance(previous, str) and previous:
            stored = read_id(previous, key_id)
            if stored is None:
                raise _not_stored(previous, "previous_response_id")
            out.body = untag(out.body, previous, stored)
            return _ready(
                _owner_route(relay, stored, previous, model, "previous_response_id", key_id)
            )
    if (
        endpoint.injects_usage
        and payload.stream
        and (relay.ledger.enabled or out.ticket or relay.access.enabled)
    ):
        asks = usage_request(payload)
        out.client_asked_usage = asks.client_asked
        if asks.inject:
            out.usage_body = with_usage_parts(out.body, payload)
    fairq = api.fairq
    if fairq.busy and model in fairq.busy:
        return _queued(request, api, endpoint, key_id, model, out, payload)
    conversation = partial(conversation_key, payload, request.headers.get("x-session-id"))
    route = relay.router.route(
        key_id,
        model,
        affinity_path=endpoint.affinity,
        conversation=conversation,
        opens=partial(first_turn, payload),
    )
    return traced("route", route) if relay.tracing.enabled else route


def _set_model(request: web.Request, relay: Relay, out: Outgoing, model: str) -> None:
    """The request's canonical model, for its errors and (when on) its access line and span."""
    out.model = model
    if relay.access.enabled or relay.tracing.enabled:
        request[MODEL] = model


async def _ready(route: Route) -> Route:
    return route


async def _queued(
    request: web.Request,
    api: ApiState,
    endpoint: Endpoint,
    key_id: Any,
    model: str,
    out: Outgoing,
    payload: Payload,
) -> Route:
    """Every backend of the model is saturated: wait in the fair queue, then route. The
    released request goes to its own target when that has room, else to the backend whose
    room released it (a spill: the binding stays)."""
    fairq = api.fairq
    priority = api.limiter.priority(key_id)
    try:
        released = await fairq.wait(key_id, model, priority, _estimate(payload, out.body))
    except QueueRefused as refused:
        raise _queue_refused(refused, model) from None
    out.queued = released is not None
    conversation = partial(conversation_key, payload, request.headers.get("x-session-id"))
    try:
        route = await api.relay.router.route(
            key_id,
            model,
            affinity_path=endpoint.affinity,
            conversation=conversation,
            opens=partial(first_turn, payload),
        )
    finally:
        if released is not None:
            fairq.sent(released)
    if released is not None and _elsewhere(fairq, route, released, key_id):
        route.backend = released
        if route.affinity != "bypass":
            route.affinity = "spill"
    return route


def _elsewhere(fairq: FairQueue, route: Route, released: Backend, key_id: Any) -> bool:
    """Whether a released request goes to the backend whose room released it: its own target
    is another one that does not keep it (FairQueue.keeps_target; never a request pinned to a
    stored response)."""
    return (
        route.backend is not released
        and not route.pinned
        and not fairq.keeps_target(route.backend, released, route.model, key_id)
        and route.model in released.models
    )


def _queue_refused(refused: QueueRefused, model: str) -> ApiError:
    retry = max(1, math.ceil(refused.retry_after_s))
    headers = {"Retry-After": str(retry), "retry-after-ms": str(retry * 1000)}
    if refused.status == 429:
        return ApiError(
            429,
            f"Too many of this key's requests are waiting for '{short(model)}', whose backends "
            f"are all busy. Please try again in {retry}s.",
            "requests",
            None,
            "rate_limit_exceeded",
            headers=headers,
        )
    return ApiError(
        503,
        f"Every backend of '{short(model)}' is busy; the request waited too long for room.",
        "service_unavailable",
        None,
        "overloaded",
        headers=headers,
    )


async def _multipart(request: web.Request, api: ApiState, key_id: Any, out: Outgoing) -> Route:
    """Audio: the model is a form field; the form goes upstream as received (model rewritten
    to its canonical name), with the client's boundary."""
    relay = api.relay
    content_type = request.headers.get("Content-Type", "")
    found = form_model(out.body, content_type)
    if found is None:
        raise ApiError(
            400,
            "Expected a multipart/form-data body with a 'model' field.",
            "invalid_request_error",
            "model",
            "missing_required_parameter",
        )
    given, (start, end) = found
    model = relay.backends.canonical(given)
    if model is None:
        raise _unknown_model(given)
    _set_model(request, relay, out, model)
    if model != given:
        out.body = out.body[:start] + model.encode() + out.body[end:]
    out.content_type = content_type
    _admit(api, key_id, model, out, 0)
    return await relay.router.route(key_id, model, affinity_path=False)


def _to_owner(request: web.Request, api: ApiState, key_id: Any, out: Outgoing) -> Route:
    """GET /v1/responses/{id} and its cancel: the path's id goes to its owner, untagged."""
    client_id = request.match_info["response_id"]
    stored = read_id(client_id, key_id)
    if stored is None:
        raise _not_stored(client_id, None)
    out.path = request.path.replace(client_id, stored.backend_id, 1)
    out.content_type = request.headers.get("Content-Type") if out.body else None
    return _owner_route(api.relay, stored, client_id, "", None)


def _owner_route(
    relay: Relay,
    stored: StoredId,
    client_id: str,
    model: str,
    param: str | None,
    key_id: Any = None,
) -> Route:
    try:
        return relay.router.to_owner(stored.owner, model, key_id)
    except OwnerGone:
        raise _not_stored(client_id, param, gone=True) from None
