"""POST /v1/chat/completions and /v1/completions: authenticate, validate, route, forward.

The hot path awaits nothing but the upstream on a cache hit, logs nothing per request above
debug, and streams SSE through chunk by chunk. A failure before the first byte reaches the
client is retried once on another backend; after it, the stream ends with an SSE error event.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from affinity_node.auth.keycache import InvalidKey, KeysUnavailable
from affinity_node.http.errors import ApiError, short, sse_error_event, unauthorized
from affinity_node.http.state import NODE, NodeState
from affinity_node.routing.pool import Backend
from affinity_node.routing.router import NoBackend, Route

log = logging.getLogger(__name__)

MAX_MODEL_LEN = 256
_HOP_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding", "connection",
                          "keep-alive", "date", "server"})


CLIENT_GONE = "affinity_client_gone"
"""Request key set when the client disconnected mid-response (counted as 499)."""


REQUEST_ID_KEY = web.RequestKey("affinity_request_id", str)


def assign_request_id(request: web.Request) -> str:
    """The client's x-request-id when sane, else a new one; set once, by the middleware, and
    read as request[REQUEST_ID_KEY] afterwards."""
    rid = request.headers.get("x-request-id", "")
    if not (0 < len(rid) <= 128 and rid.isprintable()):
        rid = os.urandom(16).hex()
    request[REQUEST_ID_KEY] = rid
    return rid


async def authenticate(node: NodeState, request: web.Request) -> uuid.UUID:
    header = request.headers.get("Authorization")
    if not header:
        raise unauthorized("Missing API key: send 'Authorization: Bearer sk-...'.")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > 512:
        raise unauthorized("Malformed Authorization header: expected 'Bearer <key>'.")
    assert node.keys is not None
    try:
        return await node.keys.authenticate(secret)
    except InvalidKey:
        raise unauthorized("Invalid or revoked API key.") from None
    except KeysUnavailable:
        raise ApiError(503, "Cannot verify the API key right now; retry shortly.",
                       "service_unavailable", None, "keys_unavailable",
                       headers={"Retry-After": "1"}) from None


async def read_payload(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, "Request body too large.", "invalid_request_error", None,
                       "request_too_large") from None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The body is not valid JSON.", "invalid_request_error", None,
                       "invalid_json") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The body must be a JSON object.", "invalid_request_error")
    model = payload.get("model")
    if model is None:
        raise ApiError(400, "Missing required parameter: 'model'.", "invalid_request_error",
                       "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string.", "invalid_request_error",
                       "model", "invalid_type")
    if len(model) > MAX_MODEL_LEN:
        raise ApiError(400, f"'model' is longer than {MAX_MODEL_LEN} characters.",
                       "invalid_request_error", "model", "invalid_value")
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", "invalid_request_error", "stream",
                       "invalid_type")
    return body, payload


def canonical_body(body: bytes, payload: dict[str, Any], canonical: str) -> bytes:
    """Backends serve the canonical name; an alias in the request is rewritten."""
    if payload["model"] == canonical:
        return body
    payload = {**payload, "model": canonical}
    return json.dumps(payload).encode()


async def handle_completion(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    started = time.perf_counter()
    rid = request[REQUEST_ID_KEY]
    headers = {"x-request-id": rid, "x-affinity-node": node.config.node_id}
    if node.draining:
        raise ApiError(503, "This node is shutting down; retry on another.", "service_unavailable",
                       None, "draining", headers={"Retry-After": "1", "Connection": "close"})
    key_id = await authenticate(node, request)
    body, payload = await read_payload(request)
    model = node.pool.canonical(payload["model"])
    if model is None:
        raise ApiError(404, f"The model '{short(payload['model'])}' does not exist.",
                       "invalid_request_error", "model", "model_not_found")
    assert node.router is not None
    try:
        route = await node.router.route(key_id, model, affinity_path=True)
    except NoBackend:
        raise ApiError(503, f"No healthy backend serves '{model}' right now.",
                       "service_unavailable", "model", "no_healthy_backend",
                       headers={"Retry-After": "1"}) from None
    upstream_body = canonical_body(body, payload, model)
    stream = bool(payload.get("stream"))
    return await Forwarder(node, request, headers, started).run(
        route, key_id, model, upstream_body, stream
    )


class Forwarder:
    """One request's trip upstream, with at most one retry before the first byte."""

    def __init__(
        self, node: NodeState, request: web.Request, headers: dict[str, str], started: float
    ) -> None:
        self.node = node
        self.request = request
        self.headers = headers
        self.started = started
        self.upstream_time = 0.0
        self.exemplar = node.http_metrics.ttft_exemplar(headers["x-request-id"])

    async def run(
        self, route: Route, key_id: uuid.UUID, model: str, body: bytes, stream: bool
    ) -> web.StreamResponse:
        node = self.node
        pool = node.pool
        backend = route.backend
        tried: list[Backend] = []
        affinity = route.affinity
        while True:
            try:
                response, ok = await self._attempt(backend, body, stream, affinity)
            except _Retryable as exc:
                pool.report_failure(backend, exc.reason)
                tried.append(backend)
                alt = node.router.fallback(model, exclude=tried) if node.router else None
                if alt is None or len(tried) > 1:
                    raise ApiError(502, f"Upstream failed: {exc.reason}.", "server_error", None,
                                   "upstream_error") from None
                if route.bound is not None and backend is route.bound:
                    affinity = "rebind"
                backend = alt
                continue
            break
        if ok:
            pool.report_success(backend)
            engine = node.engine
            if engine is not None and route.bound is not None and route.affinity != "spill":
                if backend is route.bound:
                    engine.served(key_id, model, backend.id)
                elif route.bound in tried:
                    engine.failed_over(key_id, model, route.bound.id, backend.id)
        node.http_metrics.overhead.observe(
            max(time.perf_counter() - self.started - self.upstream_time, 0.0)
        )
        return response

    async def _attempt(
        self, backend: Backend, body: bytes, stream: bool, affinity: str
    ) -> tuple[web.StreamResponse, bool]:
        node = self.node
        session = node.session
        assert session is not None
        m = node.http_metrics
        url = backend.id + self.request.path
        up_headers = {
            "Content-Type": "application/json",
            "x-request-id": self.headers["x-request-id"],
        }
        sent = time.perf_counter()
        node.pool.acquire(backend)
        try:
            try:
                upstream = await session.post(url, data=body, headers=up_headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                m.count_upstream(backend.id, "error")
                raise _Retryable(f"cannot reach backend ({type(exc).__name__})") from None
            async with upstream:
                m.count_upstream(backend.id, str(upstream.status))
                if upstream.status >= 500:
                    raise _Retryable(f"backend answered {upstream.status}")
                headers = {**self.headers, "x-affinity": affinity}
                for name, value in upstream.headers.items():
                    if name.lower() not in _HOP_HEADERS and name.lower() not in headers:
                        headers[name] = value
                ctype = upstream.headers.get("Content-Type", "application/json")
                if stream and upstream.status == 200 and ctype.startswith("text/event-stream"):
                    return await self._stream(backend, upstream, headers, sent)
                try:
                    data = await upstream.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise _Retryable(f"backend broke the response ({type(exc).__name__})") from None
                now = time.perf_counter()
                m.observe_ttft(backend.id, now - sent, self.exemplar)
                self.upstream_time += now - sent
                headers["Content-Type"] = ctype
                return web.Response(status=upstream.status, body=data, headers=headers), (
                    upstream.status < 400
                )
        finally:
            node.pool.release(backend)

    async def _stream(
        self,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
        sent: float,
    ) -> tuple[web.StreamResponse, bool]:
        m = self.node.http_metrics
        content = upstream.content
        try:
            first = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"backend broke the stream ({type(exc).__name__})") from None
        got_first = time.perf_counter()
        m.observe_ttft(backend.id, got_first - sent, self.exemplar)
        self.upstream_time += got_first - sent
        headers.update({
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        response = web.StreamResponse(status=200, headers=headers)
        ok = True
        try:
            await response.prepare(self.request)
            chunk = first
            while chunk:
                await response.write(chunk)
                wait = time.perf_counter()
                try:
                    chunk = await content.readany()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ok = False
                    self.node.pool.report_failure(backend, "stream broken")
                    await response.write(sse_error_event(
                        f"The backend stream broke ({type(exc).__name__})."))
                    break
                finally:
                    self.upstream_time += time.perf_counter() - wait
            await response.write_eof()
        except ConnectionError:
            # The client went away mid-stream (routine). Leaving the `async with` closes the
            # upstream connection, so the backend stops generating too.
            self.request[CLIENT_GONE] = True
            return response, False
        return response, ok


class _Retryable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


__all__ = ["CLIENT_GONE", "REQUEST_ID_KEY", "assign_request_id", "handle_completion"]
