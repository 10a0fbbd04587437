"""Every response gets an OpenAI error body when it is an error, and is counted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from affinity_node.http.errors import ApiError, error_response
from affinity_node.http.proxy import CLIENT_GONE, REQUEST_ID_KEY, assign_request_id
from affinity_node.http.state import NODE
from affinity_node.observability.logs import REQUEST_ID

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COMPLETION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
KNOWN_ROUTES = COMPLETION_ROUTES | {"/v1/models", "/healthz", "/readyz", "/metrics"}

_HTTP_ERRORS = {
    404: ("Unknown URL: no such route.", "invalid_request_error", "unknown_url"),
    405: ("Method not allowed for this route.", "invalid_request_error", "method_not_allowed"),
    413: ("Request body too large.", "invalid_request_error", "request_too_large"),
}


def _route_label(request: web.Request) -> str:
    """Bounded: only known paths become labels."""
    return request.path if request.path in KNOWN_ROUTES else "other"


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    route = _route_label(request)
    is_completion = route in COMPLETION_ROUTES
    started = time.perf_counter()
    rid = assign_request_id(request)
    context = REQUEST_ID.set(rid)  # every log line while handling it names the request
    code = "500"
    if is_completion:
        node.active += 1
        node.idle.clear()
    try:
        response = await handler(request)
        code = "499" if request.get(CLIENT_GONE) else str(response.status)
        return response
    except ApiError as err:
        code = str(err.status)
        return error_response(err, _base_headers(request))
    except web.HTTPException as exc:
        code = str(exc.status)
        if exc.status < 400:
            raise
        message, type_, err_code = _HTTP_ERRORS.get(
            exc.status, (exc.reason, "invalid_request_error", None)
        )
        return error_response(
            ApiError(exc.status, message, type_, None, err_code), _base_headers(request)
        )
    except asyncio.CancelledError:
        code = "499"  # the client went away; routine, no traceback
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, route)
        return error_response(
            ApiError(500, "Internal error in the proxy.", "server_error", None, "internal_error"),
            _base_headers(request),
        )
    finally:
        m = node.http_metrics
        m.count_request(route, code)
        m.observe_duration(route, time.perf_counter() - started, m.duration_exemplar(route, rid))
        if is_completion:
            node.active -= 1
            if node.active == 0:
                node.idle.set()
        REQUEST_ID.reset(context)


def _base_headers(request: web.Request) -> dict[str, str]:
    node = request.app[NODE]
    return {"x-request-id": request[REQUEST_ID_KEY], "x-affinity-node": node.config.node_id}
