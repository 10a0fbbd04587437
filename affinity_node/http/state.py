"""What the handlers read, behind typed application keys: set by the composition root
(app.py) before the first request, never None while requests are served (what is switched
off by the config is a null object: the ledger, the access log). Every key of the node is
declared here, and only here."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from uuid import UUID

from aiohttp import web
from prometheus_client import CollectorRegistry

from affinity_node.auth.keycache import KeyCache
from affinity_node.auth.limits import Limiter
from affinity_node.config import LimitsConfig, NodeConfig
from affinity_node.ledger.ledger import Ledger
from affinity_node.observability.logs import AccessLog, NullAccessLog
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.observability.tracing import NullTracing, RequestTrace, Tracing
from affinity_node.routing.backends import BackendPool
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.fairq import FairQueue
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.router import Router
from affinity_node.upstream.client import UpstreamClient
from affinity_node.upstream.transport import Transport


@dataclass
class NodeStatus:
    """The node's own life: whether it takes new work, and how much is in progress."""

    draining: bool = False
    schema_behind: bool = False
    """The database lacks a migration this code needs: not ready, requests refused (503)."""
    active: int = 0
    """Completion requests in progress."""
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever no completion request is in progress (drain waits on it)."""

    def begin(self) -> None:
        if self.active == 0:  # the event is set only while none is
            self.idle.clear()
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()


@dataclass(frozen=True, slots=True)
class Relay:
    """The node's part of forwarding a request, built once when the node starts."""

    backends: BackendPool
    router: Router
    client: Transport
    """How requests are forwarded (the UPSTREAM client; a scripted one in unit tests)."""
    metrics: HttpMetrics
    limits: LimitsConfig
    ledger: Ledger
    access: AccessLog | NullAccessLog = field(default_factory=NullAccessLog)
    """On (`enabled`, switched by a reload): answers' usage is read for its token counts."""
    tracing: Tracing | NullTracing = field(default_factory=NullTracing)
    """Off: nothing looks for the request's span."""


@dataclass(frozen=True, slots=True)
class ApiState:
    """What a proxied request reads, built once when the node starts: one lookup per request.
    Each `request.app` and `app[...]` is a Python call; a tiny request made ~25 of them, about
    1% of its CPU."""

    relay: Relay
    status: NodeStatus
    node_id: str
    limiter: Limiter
    fairq: FairQueue


# Built with the application (no I/O):
NODE = web.AppKey("node", web.Application)
"""The node's API application; the operations app (listen.ops_port) reads its state here."""
CONFIG = web.AppKey("config", NodeConfig)
STATUS = web.AppKey("status", NodeStatus)
METRICS_REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)
AFFINITY_METRICS = web.AppKey("affinity_metrics", AffinityMetrics)
ACCESS_LOG: web.AppKey[AccessLog | NullAccessLog] = web.AppKey("access_log")
"""The null one unless logging.access is on (the route wrapper reads it once per request)."""
TRACING: web.AppKey[Tracing | NullTracing] = web.AppKey("tracing")
"""The null one unless tracing.otlp_endpoint is set."""
# Started by the node's resources (app.py), in this order:
LEDGER: web.AppKey[Ledger] = web.AppKey("ledger")
"""The null one unless ledger.enabled."""
KEYS = web.AppKey("keys", KeyCache)
LIMITER = web.AppKey("limiter", Limiter)
"""Fleet-wide per-key limits (a key without any costs one lookup)."""
UPSTREAM = web.AppKey("upstream", UpstreamClient)
BACKENDS = web.AppKey("backends", BackendPool)
HEALTH = web.AppKey("health", BackendHealth)
ENGINE = web.AppKey("engine", AffinityEngine)
ROUTER = web.AppKey("router", Router)
FAIRQ = web.AppKey("fairq", FairQueue)
"""Fair queueing under saturation (fairness.enabled off: one whose `busy` stays empty)."""
API = web.AppKey("api", ApiState)
"""What the proxied API's handler needs, in one read per request."""

# Per request:
REQUEST_ID = web.RequestKey("affinity_request_id", str)
"""Set once, by the middleware: the client's x-request-id when sane, else a new one."""
API_KEY_ID = web.RequestKey("affinity_api_key_id", UUID)
"""Set by the authentication middleware on the routes that need a key."""
CLIENT_GONE = web.RequestKey("affinity_client_gone", bool)
"""Set when the client disconnected mid-response (counted as 499)."""
MODEL = web.RequestKey("affinity_model", str)
"""The canonical model of a completion request (access log)."""
UPSTREAM_BACKEND = web.RequestKey("affinity_upstream_backend", str)
"""The backend of the latest upstream attempt, set by the forwarder (access log)."""
UPSTREAM_TTFT = web.RequestKey("affinity_upstream_ttft", float)
"""Seconds from forwarding to the first byte of the answer that was relayed (access log)."""
STREAM = web.RequestKey("affinity_stream", bool)
"""Whether the client asked for a stream (set by the forwarder when the access log is on)."""
UPSTREAM_USAGE = web.RequestKey("affinity_upstream_usage", bytes)
"""The relayed answer's usage object, as bytes (set when the access log is on)."""
TRACE = web.RequestKey("affinity_trace", RequestTrace)
"""The request's span while tracing is on."""
