"""One request's trip upstream and back: at most one retry before the first byte reaches the
client; after it, a broken stream ends with an SSE error event. SSE is relayed chunk by chunk,
and a client that goes away closes the upstream response, so the backend stops generating."""

from __future__ import annotations

import time
import uuid

import aiohttp
from aiohttp import web

from affinity_node.http.errors import ApiError, sse_error_event
from affinity_node.http.state import (
    BACKENDS,
    CLIENT_GONE,
    HEALTH,
    HTTP_METRICS,
    ROUTER,
    UPSTREAM,
    UPSTREAM_BACKEND,
    UPSTREAM_TTFT,
)
from affinity_node.routing.backends import Backend
from affinity_node.routing.router import Route
from affinity_node.vocabulary import AffinityHeader

_HOP_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
    }
)


class _Retryable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forwarder:
    def __init__(self, request: web.Request, headers: dict[str, str], started: float) -> None:
        app = request.app
        self.request = request
        self.headers = headers
        self.started = started
        self.upstream_time = 0.0
        self.pool = app[BACKENDS]
        self.health = app[HEALTH]
        self.router = app[ROUTER]
        self.client = app[UPSTREAM]
        self.metrics = app[HTTP_METRICS]
        self.exemplar = self.metrics.ttft_exemplar(headers["x-request-id"])

    async def run(
        self, route: Route, key_id: uuid.UUID, model: str, body: bytes, stream: bool
    ) -> web.StreamResponse:
        backend = route.backend
        tried: list[Backend] = []
        affinity = route.affinity
        while True:
            try:
                response, ok = await self._attempt(backend, body, stream, affinity)
            except _Retryable as exc:
                self.health.request_failed(backend, exc.reason)
                tried.append(backend)
                alt = self.router.fallback(model, exclude=tried)
                if alt is None or len(tried) > 1:
                    raise ApiError(
                        502,
                        f"Upstream failed: {exc.reason}.",
                        "server_error",
                        None,
                        "upstream_error",
                    ) from None
                if route.bound is not None and backend is route.bound:
                    affinity = "rebind"
                backend = alt
                continue
            break
        if ok:
            self.health.request_succeeded(backend)
            self.router.succeeded(route, key_id, model, backend, tried)
        self.metrics.overhead.observe(
            max(time.perf_counter() - self.started - self.upstream_time, 0.0)
        )
        return response

    async def _attempt(
        self, backend: Backend, body: bytes, stream: bool, affinity: AffinityHeader
    ) -> tuple[web.StreamResponse, bool]:
        m = self.metrics
        url = backend.id + self.request.path
        up_headers = {
            "Content-Type": "application/json",
            "x-request-id": self.headers["x-request-id"],
        }
        sent = time.perf_counter()
        self.request[UPSTREAM_BACKEND] = backend.id
        self.pool.acquire(backend)
        try:
            try:
                upstream = await self.client.post(url, body, up_headers)
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
                self.request[UPSTREAM_TTFT] = now - sent
                self.upstream_time += now - sent
                headers["Content-Type"] = ctype
                return web.Response(status=upstream.status, body=data, headers=headers), (
                    upstream.status < 400
                )
        finally:
            self.pool.release(backend)

    async def _stream(
        self,
        backend: Backend,
        upstream: aiohttp.ClientResponse,
        headers: dict[str, str],
        sent: float,
    ) -> tuple[web.StreamResponse, bool]:
        m = self.metrics
        content = upstream.content
        try:
            first = await content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(f"backend broke the stream ({type(exc).__name__})") from None
        got_first = time.perf_counter()
        m.observe_ttft(backend.id, got_first - sent, self.exemplar)
        self.request[UPSTREAM_TTFT] = got_first - sent
        self.upstream_time += got_first - sent
        headers.update(
            {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
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
                    self.health.request_failed(backend, "stream broken")
                    await response.write(
                        sse_error_event(f"The backend stream broke ({type(exc).__name__}).")
                    )
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
