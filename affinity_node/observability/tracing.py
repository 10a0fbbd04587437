"""W3C trace context through the node, and optional OpenTelemetry spans.

Always (no dependency): a client's `traceparent` / `tracestate` go upstream, so a trace runs
client -> node -> vLLM. A malformed `traceparent` is dropped (with its `tracestate`), never
refused: tracing is a hint, as affinity is.

With `tracing.otlp_endpoint` set and the `otel` extra installed, each API request is a SERVER
span (the client's trace continued, or a new one, sampled parent-based by ratio) with children
for authenticate, route, the database trip of a miss and each upstream attempt (CLIENT, whose
context is what the backend receives). opentelemetry is imported only then: a node without it
runs, and with tracing off the request path pays one context-variable read per child site.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
TRACESTATE_MAX: Final = 512
"""W3C asks propagators to pass at least 512 characters; a longer tracestate is dropped."""


EXPORT_TIMEOUT_S: Final = 2.0
"""One batch's export, retries included: also what a node's stop waits for a collector that
is down."""


class TracingUnavailable(RuntimeError):
    """tracing.otlp_endpoint is set but opentelemetry (the `otel` extra) is not installed."""


def valid_traceparent(value: str) -> bool:
    """W3C Trace Context level 1: `00-<32 hex>-<16 hex>-<2 hex>` (lowercase), ids not all
    zero; a later version may append `-...`; version ff is invalid."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return False
    version, trace_id, span_id = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return False
    if version == "00":
        return len(value) == 55
    return len(value) == 55 or value[55] == "-"


def _valid_tracestate(value: str) -> bool:
    return 0 < len(value) <= TRACESTATE_MAX and value.isascii() and value.isprintable()


def trace_context(traceparents: Iterable[str], tracestates: Iterable[str]) -> dict[str, str]:
    """The trace headers to pass upstream from a request's header lines: none unless exactly
    one valid traceparent; tracestate lines joined (RFC 9110), dropped when malformed."""
    parents = list(traceparents)
    if len(parents) != 1 or not valid_traceparent(parents[0]):
        return {}
    out = {"traceparent": parents[0]}
    state = ",".join(s.strip() for s in tracestates)
    if state and _valid_tracestate(state):
        out["tracestate"] = state
    return out


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a valid traceparent (for the access log and exemplars)."""
    if traceparent is None or not valid_traceparent(traceparent):
        return None
    return traceparent[3:35]


def traces_url(endpoint: str) -> str:
    """The collector's base URL gets the OTLP/HTTP traces path; a full URL stays as is."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


class RequestTrace:
    """One request's SERVER span while tracing is on: its children, its context upstream."""

    __slots__ = ("_otel", "_span", "_token", "_tracer", "trace_id")

    def __init__(self, tracing: Tracing, span: Any, token: Any) -> None:
        self._otel = tracing.otel
        self._tracer = tracing.tracer
        self._span = span
        self._token = token
        ctx = span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None

    def child(self, name: str) -> AbstractContextManager[Any]:
        return self._tracer.start_as_current_span(name)

    async def traced(self, name: str, work: Coroutine[Any, Any, T]) -> T:
        with self._tracer.start_as_current_span(name):
            return await work

    def upstream(self, backend: str, headers: dict[str, str]) -> Any:
        """A CLIENT span for one upstream attempt; `headers` get its traceparent/tracestate.
        The caller ends it."""
        otel = self._otel
        span = self._tracer.start_span(
            "upstream", kind=otel.SpanKind.CLIENT, attributes={"affinity.backend": backend}
        )
        otel.propagator.inject(headers, context=otel.set_span_in_context(span))
        return span

    def end(self, status: int, attributes: Mapping[str, str | None]) -> None:
        span = self._span
        span.set_attribute("http.response.status_code", status)
        for name, value in attributes.items():
            if value is not None:
                span.set_attribute(name, value)
        if status >= 500:
            span.set_status(self._otel.Status(self._otel.StatusCode.ERROR))
        self._otel.context.detach(self._token)
        _CURRENT.set(None)
        span.end()


class _Otel:
    """The opentelemetry names the node uses, imported once, on demand."""

    def __init__(self) -> None:
        try:
            from opentelemetry import context, trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise TracingUnavailable(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed "
                f"(pip install 'affinity-node[otel]'): {exc}"
            ) from None
        self.context = context
        self.SpanKind = trace.SpanKind
        self.Status = trace.Status
        self.StatusCode = trace.StatusCode
        self.set_span_in_context = trace.set_span_in_context
        self.propagator = TraceContextTextMapPropagator()
        self.OTLPSpanExporter = OTLPSpanExporter
        self.Resource = Resource
        self.TracerProvider = TracerProvider
        self.BatchSpanProcessor = BatchSpanProcessor
        self.ParentBased = ParentBased
        self.TraceIdRatioBased = TraceIdRatioBased


class Tracing:
    """The node's tracer: its own provider (not the process-global one, so several nodes in
    one process keep apart), exporting in batches from a background thread."""

    enabled: Final = True

    def __init__(
        self, endpoint: str, sample_ratio: float, flush_interval_s: float, node_id: str
    ) -> None:
        otel = self.otel = _Otel()
        self.provider = otel.TracerProvider(
            sampler=otel.ParentBased(otel.TraceIdRatioBased(sample_ratio)),
            resource=otel.Resource.create(
                {"service.name": "affinity-node", "service.instance.id": node_id}
            ),
        )
        exporter = otel.OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)
        self.provider.add_span_processor(
            otel.BatchSpanProcessor(exporter, schedule_delay_millis=flush_interval_s * 1000)
        )
        self.tracer = self.provider.get_tracer("affinity_node")

    def begin(self, method: str, route: str, incoming: dict[str, str]) -> RequestTrace:
        """The request's SERVER span, current until `end` (children find it)."""
        otel = self.otel
        parent = otel.propagator.extract(incoming) if incoming else None
        span = self.tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=otel.SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )
        token = otel.context.attach(otel.set_span_in_context(span, parent))
        trace = RequestTrace(self, span, token)
        _CURRENT.set(trace)
        return trace

    async def close(self) -> None:
        """Sends what is pending (within EXPORT_TIMEOUT_S)."""
        await asyncio.to_thread(self.provider.shutdown)


class NullTracing:
    """Tracing off: the route wrapper checks `enabled` and starts nothing."""

    enabled: Final = False

    async def close(self) -> None:
        pass


def make_tracing(
    endpoint: str, sample_ratio: float, flush_interval_s: float, node_id: str
) -> Tracing | NullTracing:
    if not endpoint:
        return NullTracing()
    return Tracing(endpoint, sample_ratio, flush_interval_s, node_id)


_CURRENT: ContextVar[RequestTrace | None] = ContextVar("affinity_trace", default=None)
"""The request being traced by this task (tasks started while serving it inherit it)."""
_NULL: Final = nullcontext()


def current() -> RequestTrace | None:
    return _CURRENT.get()


def span(name: str) -> AbstractContextManager[Any]:
    """A child span of the traced request, or nothing."""
    trace = _CURRENT.get()
    return _NULL if trace is None else trace.child(name)


def traced(name: str, work: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """`work` in a child span of the traced request; `work` itself when nothing is traced
    (no extra frame on the request path)."""
    trace = _CURRENT.get()
    return work if trace is None else trace.traced(name, work)
