"""One request's trip upstream and back.

- Before the first byte reaches the client, a backend that cannot be reached, answers 5xx or
  drops the connection is reported to the health state machine and the request is retried once
  elsewhere. A backend that accepted the request but stays silent past the read timeout (the
  generation timeout for non-streamed answers) is not retried: that would start the same
  generation twice. The client gets 504 and the backend is not blamed (health checks decide).
- SSE is relayed chunk by chunk; a stream that breaks after its first byte ends with an SSE
  error event. A client that goes away, or stops reading for longer than the write timeout,
  closes the upstream response, so the backend stops generating and its in-flight slot frees.
- Hop-by-hop headers (RFC 9110 section 7.6.1, and any header the Connection header names) never
  cross the proxy; the backend compresses only when the client asked for it.
- With the usage ledger on, every answer a backend gave is recorded with its `usage` (found
  from the end of a body, or in a stream's last usage event: http/usage_wire.py). A vllm
  backend is asked for a stream's usage when the client did not ask, and that event is
  removed from what the client gets.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from affinity_node.auth.limits import Ticket
from affinity_node.http.endpoints import ErrorShape
from affinity_node.http.errors import ApiError, sse_error_event
from affinity_node.http.response_ids import IdTagger
from affinity_node.http.state import (
    CLIENT_GONE,
    STREAM,
    UPSTREAM_BACKEND,
    UPSTREAM_TTFT,
    UPSTREAM_USAGE,
    Relay,
)
from affinity_node.http.usage_wire import StreamUsage, usage_span
from affinity_node.ledger.usage import merged_usage
from affinity_node.observability.metrics import add_trace_id
from affinity_node.observability.tracing import current as current_trace
from affinity_node.observability.tracing import trace_context, trace_id_of
from affinity_node.routing.backends import Backend
from affinity_node.routing.router import Route
from affinity_node.upstream.http1 import BodyParts, UpstreamFailed, UpstreamTimeout
from affinity_node.upstream.transport import Answer
from affinity_node.vocabulary import CACHE_KINDS, AffinityHeader, LedgerOutcome

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})  # fmt: skip
_SET_HERE = frozenset({"content-type", "content-length", "date", "server"})
"""Response headers this proxy writes itself."""


_NOT_PASSED = HOP_BY_HOP | _SET_HERE
_NAMES_NOTHING = frozenset({"keep-alive", "close"})
"""Connection header values that name no other header (keep-alive is hop-by-hop itself)."""


def passed_headers(upstream: CIMultiDictProxy[str], base: dict[str, str]) -> dict[str, str]:
    """The backend's response headers a client may see, on top of `base` (which wins; its
    names are lower case)."""
    headers = dict(base)
    named = upstream.get("Connection")
    dropped = _NOT_PASSED
    if named and named.lower() not in _NAMES_NOTHING:
        dropped = _NOT_PASSED | {t.strip().lower() for t in named.split(",")}
    for name, value in upstream.items():
        low = name.lower()
        if low not in dropped and low not in base:
            headers[name] = value
    return headers


class _Retryable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Silent(Exception):
    """The backend accepted the request and then said nothing for too long."""


@dataclass(slots=True)
class Outgoing:
    """What one request sends upstream, and how its answer is treated."""

    body: bytes
    stream: bool
    path: str
    """Upstream path (the client's, or with a stored response's id untagged)."""
    method: str = "POST"
    model: str = ""
    """The canonical model, once the body named one."""
    content_type: str | None = "application/json"
    usage_body: BodyParts | None = None
    """The body that also asks for a stream's usage, for vllm and llamacpp backends."""
    client_asked_usage: bool = False
    """A stream whose usage event the client gets (asked for, or the API always sends it)."""
    tag_ids: bool = False
    """Response ids in the answer are tagged with their owner (Responses API)."""
    merge_usage: bool = False
    """A stream's usage is split over its first and last usage events (Anthropic)."""
    record: bool = True
    """Recorded in the usage ledger."""
    errors: ErrorShape = "openai"
    """How a stream that breaks says so."""
    ticket: Ticket | None = None
    """A limited key's charge: its answer's usage is read (tpm) even without the ledger."""
    queued: bool = False
    """Went through the fair queue (charged there): its end only releases the next."""


class Forwarder:
    def __init__(
        self, relay: Relay, request: web.Request, headers: dict[str, str], started: float
    ) -> None:
        self.request = request
        self.headers = headers
        self.started = started
        self.upstream_time = 0.0
        self.backends = relay.backends
        self.router = relay.router
        self.client = relay.client
        self.metrics = relay.metrics
        self.limits = relay.limits
        self.exemplar = self.metrics.ttft_exemplar(headers["x-request-id"])
        self.ledger = relay.ledger
        self.access_log = relay.access.enabled
        self.trace = current_trace() if relay.tracing.enabled else None
        """The request's span (tracing on): each attempt is its child, and says so upstream."""
        self.observed = self.access_log or relay.tracing.enabled
        """The access line or the span reads the request's backend (and the line its TTFT)."""
        self.trace_headers: dict[str, str] | None = None
        """The client's valid traceparent/tracestate, passed upstream as received."""
        if self.trace is None and "traceparent" in request.headers:
            self.trace_headers = trace_context(
                request.headers.getall("traceparent"), request.headers.getall("tracestate", ())
            )
        if self.exemplar is not None:
            self._trace_exemplar(self.exemplar)
        self.broken: str | None = None
        """Why the backend broke an answer already under way (reported after the request)."""
        self.usage: bytes | None = None
        """The answer's usage object, as bytes (the ledger decodes it later)."""
        self.wants_usage = self.ledger.enabled
        """The answer's usage is looked for (the ledger, or a limited key's tokens)."""

    async def run(self, route: Route, key_id: uuid.UUID, out: Outgoing) -> web.StreamResponse:
        """Forwards `out` where `route` says; where a failed request goes next is the router's
        decision (`after_failure`)."""
        self.out = out
        self.wants_usage = self.ledger.enabled or out.ticket is not None or self.access_log
        body, usage_body = out.body, out.usage_body
        while True:
            backend = route.backend
            sent_body = (
                usage_body if usage_body is not None and backend.kind in CACHE_KINDS else body
            )
            try:
                response, ok = await self._attempt(
                    backend, key_id, sent_body, route.affinity, asked=sent_body is not body
                )
            except _Retryable as exc:
                if self.router.after_failure(route, exc.reason) is None:
                    raise ApiError(
                        502,
                        f"Upstream failed: {exc.reason}.",
                        "server_error",
                        None,
                        "upstream_error",
                    ) from None
                continue
            except _Silent:
                timeout = (
                    self.limits.upstream_read_timeout_seconds
                    if out.stream
                    else (self.limits.generation_timeout_seconds)
                )
                raise ApiError(
                    504,
                    f"The backend did not answer within {timeout:g} s.",
                    "server_error",
                    None,
                    "upstream_timeout",
                ) from None
            break
        if ok:
            self.router.succeeded(route)
        elif self.broken is not None:
            self.router.broke(route, self.broken)
        if out.record:
            outcome: LedgerOutcome = route.affinity
            if outcome == "hit" and not route.first:
                outcome = "fanout"
            self.ledger.record(key_id, route.model, backend.id, outcome, self.usage)
            if ok and self.usage is None:
                self.ledger.count_unreported()
        self.metrics.overhead.observe(
            max(time.perf_counter() - self.started - self.upstream_time, 0.0)
        )
        if self.access_log:
            self.request[STREAM] = out.stream
            if self.usage is not None:
                self.request[UPSTREAM_USAGE] = self.usage
        return response

    def _trace_exemplar(self, exemplar: dict[str, str]) -> None:
        trace = self.trace
        trace_id = (
            trace.trace_id
            if trace is not None
            else trace_id_of(self.trace_headers.get("traceparent") if self.trace_headers else None)
        )
        if trace_id is not None:
            add_trace_id(exemplar, trace_id)

    async def _attempt(
        self,
        backend: Backend,
        key_id: uuid.UUID,
        body: bytes | BodyParts,
        affinity: AffinityHeader,
        asked: bool,
    ) -> tuple[web.StreamResponse, bool]:
        """`asked`: the node asked this backend for a stream's usage (the client did not)."""
        m = self.metrics
        out = self.out
        stream = out.stream
        up_headers = {
            "x-request-id": self.headers["x-request-id"],
            # A stream whose usage event the node removes must come uncompressed.
            "Accept-Encoding": "identity"
            if asked
            else self.request.headers.get("Accept-Encoding", "identity"),
        }
        if out.content_type is not None:
            up_headers["Content-Type"] = out.content_type
        if self.trace_headers:
            up_headers.update(self.trace_headers)
        span = None if self.trace is None else self.trace.upstream(backend.id, up_headers)
        sent = time.perf_counter()
        if self.observed:
            self.request[UPSTREAM_BACKEND] = backend.id
        self.backends.acquire(backend)
        try:
            try:
                upstream = await self.client.post(
                    backend.id, out.path, body, up_headers, stream, out.method
                )
            except UpstreamTimeout:
                m.count_upstream(backend.id, "timeout")
                raise _Silent from None
            except UpstreamFailed as exc:
                m.count_upstream(backend.id, "error")
                raise _Retryable(f"cannot reach backend ({exc})") from None
            async with upstream:
                m.count_upstream(backend.id, str(upstream.status))
                if upstream.status >= 500:
                    raise _Retryable(f"backend answered {upstream.status}")
                headers = passed_headers(upstream.headers, {**self.headers, "x-affinity": affinity})
                ctype = upstream.headers.get("Content-Type", "application/json")
                plain = upstream.headers.get("Content-Encoding", "identity") == "identity"
                tagger = IdTagger(backend.id, key_id) if out.tag_ids and plain else None
                if stream and upstream.status == 200 and ctype.startswith("text/event-stream"):
                    watch = None
                    if self.wants_usage and plain and (asked or out.client_asked_usage):
                        watch = StreamUsage(strip=asked)
                    return await self._stream(backend, upstream, headers, sent, watch, tagger)
                try:
                    data = await upstream.read()
                except UpstreamTimeout:
                    raise _Silent from None
                except UpstreamFailed as exc:
                    raise _Retryable(f"backend broke the response ({exc})") from None
                now = time.perf_counter()
                m.observe_ttft(backend.id, now - sent, self.exemplar)
                if self.access_log:
                    self.request[UPSTREAM_TTFT] = now - sent
                self.upstream_time += now - sent
                headers["Content-Type"] = ctype
                if self.wants_usage and upstream.status == 200 and plain and out.record:
                    self.usage = usage_span(data)
                if tagger is not None:
                    data = tagger.body(data)
        finally:
            self.backends.release(backend)
            if span is not None:
                span.end()
        response = web.Response(status=upstream.status, body=data, headers=headers)
        lines = sum(map(len, headers)) + sum(map(len, headers.values())) + 4 * len(headers)
        if _fits(self.request, len(data) + lines):
            # aiohttp writes it as soon as the handler returns, without waiting on the client.
            return response, upstream.status < 400
        return await self._send(response), upstream.status < 400

    async def _send(self, response: web.Response) -> web.StreamResponse:
        """Writes a whole answer that may have to wait on the client here, under the write
        timeout, rather than after the handler returns: a client that does not read it is
        dropped after the timeout, as a stream's is (aiohttp would wait for it forever,
        holding the answer). The backend is already free."""
        deadline = _WriteDeadline(self.limits.client_write_timeout_seconds)
        deadline.began = deadline.now()
        try:
            await response.prepare(self.request)
            await response.write_eof()
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
            return self._client_gone(response)[0]
        except (ConnectionError, TimeoutError):
            return self._client_gone(response)[0]
        finally:
            deadline.close()
        return response

    def _client_gone(self, response: web.StreamResponse) -> tuple[web.StreamResponse, bool]:
        """The client went away or stalled mid-stream. Leaving the `async with upstream` closes
        the upstream connection, so the backend stops generating too."""
        self.request[CLIENT_GONE] = True
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return response, False

    async def _stream(
        self,
        backend: Backend,
        upstream: Answer,
        headers: dict[str, str],
        sent: float,
        watch: StreamUsage | None,
        tagger: IdTagger | None,
    ) -> tuple[web.StreamResponse, bool]:
        """Relays the SSE stream; `watch` (ledger on) sees every chunk on its way, `tagger`
        tags the response ids in it."""
        m = self.metrics
        try:
            first = await upstream.readany()
        except UpstreamTimeout:
            raise _Silent from None
        except UpstreamFailed as exc:
            raise _Retryable(f"backend broke the stream ({exc})") from None
        got_first = time.perf_counter()
        m.observe_ttft(backend.id, got_first - sent, self.exemplar)
        if self.access_log:
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
        # A client that stops reading fills its socket buffer; a write waiting past the write
        # timeout treats it as gone, so the backend's slot frees.
        deadline = _WriteDeadline(self.limits.client_write_timeout_seconds)
        try:
            await response.prepare(self.request)
            last = b""  # the backend's last bytes: sent with the response's end, one write
            chunk = first
            while chunk:
                out = chunk if watch is None else watch.feed(chunk)
                if tagger is not None:
                    out = tagger.feed(out)
                if upstream.drained:
                    last = out
                    break
                if out:
                    deadline.began = deadline.now()
                    await response.write(out)
                    deadline.began = None
                wait = time.perf_counter()
                try:
                    chunk = await upstream.readany()
                except UpstreamFailed as exc:
                    ok = False
                    if watch is not None:
                        watch.discard()
                        watch = None
                    self.broken = "stream broken"
                    last = sse_error_event(
                        f"The backend stream broke ({exc}).", shape=self.out.errors
                    )
                    break
                finally:
                    self.upstream_time += time.perf_counter() - wait
            deadline.began = deadline.now()
            tail = b""
            if watch is not None:
                tail = watch.finish()
                self.usage = watch.raw
                if self.out.merge_usage:
                    self.usage = merged_usage(watch.first, watch.raw)
            if tagger is not None:
                tail = tagger.feed(tail) + tagger.finish()
            last = last + tail if tail else last
            await response.write_eof(last)
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
            return self._client_gone(response)
        except (ConnectionError, TimeoutError):
            return self._client_gone(response)
        finally:
            deadline.close()
        return response, ok


HEAD_ROOM = 512
"""Bytes allowed for what aiohttp adds to an answer's header lines (status, Date, Server,
Content-Length); the lines passed from the backend are counted (they can be any size)."""


def _fits(request: web.Request, size: int) -> bool:
    """Whether an answer of `size` bytes is written without waiting on the client: aiohttp
    waits only while the transport is paused, and a transport that is not paused and stays
    under its high-water mark with the answer added never pauses. Most answers fit, and aiohttp
    writes them once the handler returns (a timer armed and cancelled per request cost ~2 us,
    writing them in the handler ~2 us more); a client that pipelines requests and reads none
    fills the buffer, and its answers are written under the timer again."""
    protocol = request.protocol
    transport = protocol.transport
    if transport is None or protocol.writing_paused:
        return False
    high = transport.get_write_buffer_limits()[1]
    return transport.get_write_buffer_size() + size + HEAD_ROOM <= high


class _WriteDeadline:
    """Bounds how long one write to a streaming client may wait, with one timer per stream:
    a write marks when it began (`began`) and a check every quarter of the timeout cancels the
    stream's task once a write has waited the timeout (so a stall ends within 1.25x of it).
    asyncio.timeout would cost a timer armed and cancelled for every chunk."""

    __slots__ = ("_check_handle", "_expired", "_loop", "_task", "_timeout", "began", "now")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._timeout = timeout
        self._expired = False
        self.began: float | None = None
        self.now = self._loop.time
        self._check_handle = self._loop.call_later(timeout / 4, self._check)

    def _check(self) -> None:
        began = self.began
        if began is not None and self._loop.time() - began >= self._timeout:
            self._expired = True
            if self._task is not None:
                self._task.cancel()
            return
        self._check_handle = self._loop.call_later(self._timeout / 4, self._check)

    def expired(self) -> bool:
        """The deadline cancelled the task (and nothing else did: then that cancel stands)."""
        return self._expired and self._task is not None and self._task.uncancel() == 0

    def close(self) -> None:
        self._check_handle.cancel()
