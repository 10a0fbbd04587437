"""The route wrapper: every request gets an id, its API's error body when it fails, counted and
logged; an API key where needed (`Authorization: Bearer` or Anthropic's `x-api-key`)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from affinity_node.auth.keycache import InvalidKey, KeysUnavailable
from affinity_node.auth.secrets import api_key_secret, bearer_secret
from affinity_node.http.endpoints import ErrorShape
from affinity_node.http.errors import ApiError, error_response, unauthorized
from affinity_node.http.state import (
    ACCESS_LOG,
    API_KEY_ID,
    CLIENT_GONE,
    CONFIG,
    HTTP_METRICS,
    KEYS,
    MODEL,
    REQUEST_ID,
    STATUS,
    STREAM,
    TRACE,
    TRACING,
    UPSTREAM_BACKEND,
    UPSTREAM_TTFT,
    UPSTREAM_USAGE,
)
from affinity_node.ledger.usage import decode_usage
from affinity_node.observability.logs import REQUEST_ID as LOG_REQUEST_ID
from affinity_node.observability.logs import AccessLog, client_address
from affinity_node.observability.metrics import add_trace_id
from affinity_node.observability.tracing import (
    NullTracing,
    RequestTrace,
    Tracing,
    trace_context,
    trace_id_of,
)

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPS_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and scrapes: on the API port, or on listen.ops_port when it is set."""
OTHER = "other"
"""The route label of every path the node does not serve (labels stay bounded)."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    method: str
    path: str
    """aiohttp's path template; also the route's metric label."""
    handler: Handler
    authenticated: bool = False
    tracked: bool = False
    """Work a drain waits for (the proxied API)."""
    errors: ErrorShape = "openai"


_HTTP_ERRORS = {
    404: ("Unknown URL: no such route.", "invalid_request_error", "unknown_url"),
    405: ("Method not allowed for this route.", "invalid_request_error", "method_not_allowed"),
    413: ("Request body too large.", "invalid_request_error", "request_too_large"),
}


def _assign_request_id(request: web.Request) -> str:
    """The client's id when it is printable ASCII (it goes into upstream header lines, logs
    and exemplars), else a new one."""
    rid = request.headers.get("x-request-id", "")
    if not (0 < len(rid) <= 128 and rid.isascii() and rid.isprintable()):
        rid = os.urandom(16).hex()
    request[REQUEST_ID] = rid
    return rid


def base_headers(request_id: str, node_id: str) -> dict[str, str]:
    """Headers every answer carries, errors included."""
    return {"x-request-id": request_id, "x-affinity-node": node_id}


def answered(
    app: web.Application,
    handler: Handler,
    route: str = OTHER,
    authenticated: bool = False,
    tracked: bool = False,
    errors: ErrorShape = "openai",
) -> Handler:
    """`handler` as every request to `app` is served: an id, its API's error body when it
    fails, counted under `route`, logged; with `authenticated`, a valid key first (its id in
    request[API_KEY_ID]); `tracked` requests are work a drain waits for.

    A wrapper per route, not aiohttp middlewares: a middleware chain costs every request
    three more coroutine frames (aiohttp adds one of its own per app), each resumed at every
    await of the request (bench-overhead: ~4% of the node's throughput). What `app` is built
    with (its config, status, metrics, access log and tracing; never replaced, a reload
    changes them in place) is read here once, not per request."""

    traced = route not in OPS_ROUTES  # probes and scrapes make no spans
    node_id = app[CONFIG].node_id
    status = app[STATUS]
    m = app[HTTP_METRICS]
    access = app[ACCESS_LOG]
    tracing = app[TRACING] if traced else None

    async def answer(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = _assign_request_id(request)
        context = LOG_REQUEST_ID.set(rid)  # every log line while handling it names the request
        code = "500"
        error: str | None = None
        response: web.StreamResponse | None = None
        if tracked:
            status.begin()
        trace = (
            _begin_trace(request, route, tracing)
            if tracing is not None and tracing.enabled
            else None
        )
        try:
            if authenticated:
                if trace is None:
                    request[API_KEY_ID] = await _authenticate(app, request)
                else:
                    with trace.child("authenticate"):
                        request[API_KEY_ID] = await _authenticate(app, request)
            response = await handler(request)
            code = "499" if CLIENT_GONE in request else str(response.status)
            return response
        except ApiError as err:
            code, error = str(err.status), err.code
            return error_response(err, base_headers(rid, node_id), errors)
        except web.HTTPException as exc:
            code = str(exc.status)
            if exc.status < 400:
                raise
            message, type_, err_code = _HTTP_ERRORS.get(
                exc.status, (exc.reason, "invalid_request_error", None)
            )
            error = err_code
            return error_response(
                ApiError(exc.status, message, type_, None, err_code),
                base_headers(rid, node_id),
                errors,
            )
        except asyncio.CancelledError:
            code = "499"  # the client went away; routine, no traceback
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, route)
            error = "internal_error"
            return error_response(
                ApiError(
                    500, "Internal error in the proxy.", "server_error", None, "internal_error"
                ),
                base_headers(rid, node_id),
                errors,
            )
        finally:
            elapsed = time.perf_counter() - started
            m.count_request(route, code)
            exemplar = m.duration_exemplar(route, rid)
            if exemplar is not None:
                _with_trace_id(exemplar, request, trace)
            m.observe_duration(route, elapsed, exemplar)
            if tracked:
                status.end()
            if trace is not None:
                _end_trace(request, trace, int(code), _affinity(response))
            if access.enabled and route not in OPS_ROUTES:
                line = (route, int(code), elapsed, _affinity(response), error)
                _log_access(request, cast(AccessLog, access), *line, trace)
            LOG_REQUEST_ID.reset(context)

    return answer


def _affinity(response: web.StreamResponse | None) -> str | None:
    return response.headers.get("x-affinity") if response is not None else None


def _begin_trace(request: web.Request, route: str, tracing: Tracing | NullTracing) -> RequestTrace:
    headers = request.headers
    incoming = trace_context(headers.getall("traceparent", ()), headers.getall("tracestate", ()))
    tracing = cast(Tracing, tracing)  # the caller checked `enabled`
    trace = request[TRACE] = tracing.begin(request.method, route, incoming)
    return trace


def _end_trace(
    request: web.Request, trace: RequestTrace, status: int, affinity: str | None
) -> None:
    trace.end(
        status,
        {
            "affinity.outcome": affinity,
            "affinity.model": request.get(MODEL),
            "affinity.backend": request.get(UPSTREAM_BACKEND),
            "affinity.request_id": request[REQUEST_ID],
        },
    )


def _trace_id(request: web.Request, trace: RequestTrace | None) -> str | None:
    """The node's span's trace id, else the client's (it continues upstream)."""
    if trace is not None:
        return trace.trace_id
    return trace_id_of(request.headers.get("traceparent"))


def _with_trace_id(
    exemplar: dict[str, str], request: web.Request, trace: RequestTrace | None
) -> None:
    """An exemplar names the request's trace when there is one."""
    trace_id = _trace_id(request, trace)
    if trace_id is not None:
        add_trace_id(exemplar, trace_id)


def _log_access(
    request: web.Request,
    access: AccessLog,
    route: str,
    status: int,
    elapsed: float,
    affinity: str | None,
    error: str | None,
    trace: RequestTrace | None,
) -> None:
    """The access line's fields, gathered only when it is on."""
    usage = request.get(UPSTREAM_USAGE)
    used = None if usage is None else decode_usage(usage)
    access.emit(
        request_id=request[REQUEST_ID],
        method=request.method,
        route=route,
        status=status,
        duration_s=elapsed,
        model=request.get(MODEL),
        backend=request.get(UPSTREAM_BACKEND),
        ttft_s=request.get(UPSTREAM_TTFT),
        affinity=affinity,
        error=error,
        key_ref=access.key_ref(request.get(API_KEY_ID)),
        client=client_address(
            request.remote, request.headers.getall("X-Forwarded-For", ()), access.trusted
        ),
        stream=request.get(STREAM),
        tokens=None if used is None else (used.prompt, used.cached, used.completion),
        trace_id=_trace_id(request, trace),
    )


async def _authenticate(app: web.Application, request: web.Request) -> uuid.UUID:
    try:
        authorization = request.headers.get("Authorization")
        api_key = request.headers.get("x-api-key")
        if authorization is None and api_key is not None:
            secret = api_key_secret(api_key)
        else:
            secret = bearer_secret(authorization)
    except ValueError as exc:
        raise unauthorized(str(exc)) from None
    try:
        return await app[KEYS].authenticate(secret)
    except InvalidKey:
        raise unauthorized("Invalid or revoked API key.") from None
    except KeysUnavailable:
        raise ApiError(
            503,
            "Cannot verify the API key right now; retry shortly.",
            "service_unavailable",
            None,
            "keys_unavailable",
            headers={"Retry-After": "1"},
        ) from None


async def _method_not_allowed(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPMethodNotAllowed("", [])


async def _not_found(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound


def add_routes(app: web.Application, routes: Iterable[RouteSpec]) -> None:
    """Each route served through `answered`; any other method on those paths answers 405
    (after the key check, as the route would), any other path 404, in the route's error
    shape."""
    specs = list(routes)
    for spec in specs:
        wrapped = answered(
            app, spec.handler, spec.path, spec.authenticated, spec.tracked, spec.errors
        )
        if spec.method == "GET":
            app.router.add_get(spec.path, wrapped)
        else:
            app.router.add_route(spec.method, spec.path, wrapped)
    seen: set[str] = set()
    for spec in specs:
        if spec.path not in seen:
            seen.add(spec.path)
            app.router.add_route(
                "*",
                spec.path,
                answered(
                    app, _method_not_allowed, spec.path, spec.authenticated, errors=spec.errors
                ),
            )
    app.router.add_route("*", "/{tail:.*}", answered(app, _not_found))
