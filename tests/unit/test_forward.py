"""The forwarder's retry and SSE logic over a scripted transport: no sockets, no Postgres.

The router, backend pool, health state machine and engine (on the memory store) are the real
ones; only the backends' answers are scripted (upstream/transport.py is the seam), and the
client's connection is a recorder of the bytes aiohttp would write to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from affinity_node.config import NodeConfig
from affinity_node.http.errors import ApiError
from affinity_node.http.forward import Forwarder, Outgoing
from affinity_node.http.state import Relay
from affinity_node.ledger.ledger import NullLedger
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.routing.backends import BackendPool, BackendSpec, ModelSpec
from affinity_node.routing.health_state import BackendHealth
from affinity_node.routing.members import rendezvous
from affinity_node.routing.router import AffinityRules, Route, Router
from affinity_node.routing.strategies import make_strategy
from affinity_node.store.memory import MemoryBindingStore
from affinity_node.upstream.http1 import BodyParts, UpstreamFailed, UpstreamTimeout
from tests.unit.fakes import KEY, MODEL, Clock, make_engine

URLS = ("http://b1:8000", "http://b2:8000", "http://b3:8000")


class Scripted:
    """One answer: a status, headers and body pieces; `breaks_after` pieces, then a reset."""

    def __init__(
        self,
        status: int = 200,
        chunks: Sequence[bytes] = (b'{"ok": true}',),
        content_type: str = "application/json",
        breaks_after: int | None = None,
        silent: bool = False,
    ) -> None:
        self.status = status
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))
        self._chunks = list(chunks)
        self._breaks_after = breaks_after
        self._silent = silent
        self._given = 0
        self.closed = False

    @property
    def drained(self) -> bool:
        return not self._chunks and self._breaks_after is None

    async def read(self) -> bytes:
        if self._silent:
            raise UpstreamTimeout("silent")
        if self._breaks_after is not None:
            raise UpstreamFailed("backend closed the connection")
        data = b"".join(self._chunks)
        self._chunks = []
        return data

    async def readany(self) -> bytes:
        if self._silent:
            raise UpstreamTimeout("silent")
        if self._breaks_after is not None and self._given >= self._breaks_after:
            raise UpstreamFailed("backend closed the connection")
        if not self._chunks:
            return b""
        self._given += 1
        return self._chunks.pop(0)

    async def __aenter__(self) -> Scripted:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.closed = True


@dataclass
class ScriptedTransport:
    """The answers of the request's attempts, in order (whichever backend each goes to); an
    exception in the script is raised by `post`."""

    script: list[Scripted | Exception]
    posts: list[str] = field(default_factory=list)

    async def post(
        self,
        base_url: str,
        path: str,
        body: bytes | BodyParts,
        headers: dict[str, str],
        stream: bool,
        method: str = "POST",
    ) -> Scripted:
        self.posts.append(base_url)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


class Wire(AbstractStreamWriter):
    """What aiohttp would write to the client's socket, kept."""

    def __init__(self) -> None:
        self.buffer_size = 0
        self.output_size = 0
        self.length: int | None = 0
        self.sent = bytearray()
        self.eof = False

    async def write(self, chunk: Any) -> None:
        self.sent += bytes(chunk)

    async def write_eof(self, chunk: bytes = b"") -> None:
        self.sent += chunk
        self.eof = True

    async def drain(self) -> None:
        pass

    def enable_compression(self, encoding: str = "deflate", strategy: int | None = None) -> None:
        pass

    def enable_chunking(self) -> None:
        pass

    async def write_headers(self, status_line: str, headers: Any) -> None:
        pass

    def send_headers(self) -> None:
        pass


@dataclass
class Node:
    app: web.Application
    relay: Relay
    router: Router
    backends: BackendPool
    transport: ScriptedTransport
    wire: Wire

    async def forward(self, stream: bool = False) -> tuple[web.StreamResponse, Route]:
        request = make_mocked_request(
            "POST", "/v1/chat/completions", app=self.app, writer=self.wire
        )
        route = await self.router.route(KEY, MODEL, affinity_path=True)
        forwarder = Forwarder(self.relay, request, {"x-request-id": "r1"}, 0.0)
        out = Outgoing(b"{}", stream, "/v1/chat/completions")
        return await forwarder.run(route, KEY, out), route


def node(*script: Scripted | Exception) -> Node:
    clock = Clock()
    store = MemoryBindingStore(clock)
    pool = BackendPool([BackendSpec(u, models=[MODEL]) for u in URLS], [ModelSpec(MODEL)])
    engine, _ = make_engine(store, clock)
    router = Router(
        pool,
        make_strategy("round_robin"),
        engine,
        AffinityRules(),
        AffinityMetrics(CollectorRegistry()),
        BackendHealth(pool, eject_after_failures=3),
    )
    app = web.Application()
    transport = ScriptedTransport(list(script))
    metrics = HttpMetrics(CollectorRegistry(), "test")
    relay = Relay(pool, router, transport, metrics, NodeConfig().limits, NullLedger())
    return Node(app, relay, router, pool, transport, Wire())


async def test_a_refused_bound_backend_is_retried_once_on_the_pairs_successor() -> None:
    ok = Scripted(chunks=[b'{"id": "x"}'])
    n = node(UpstreamFailed("cannot connect (ConnectionRefusedError)"), ok)
    response, route = await n.forward()
    assert isinstance(response, web.Response) and response.body == b'{"id": "x"}'
    bound = n.transport.posts[0]
    assert len(n.transport.posts) == 2 and n.transport.posts[1] != bound
    assert route.failed[0].id == bound and route.backend.id == n.transport.posts[1]
    others = [u for u in URLS if u != bound]
    assert n.transport.posts[1] == rendezvous(KEY.bytes + MODEL.encode(), others)
    assert response.headers["x-affinity"] == "spill"  # one error: the binding stays
    pool_bound = n.backends.get(bound)
    assert pool_bound is not None and pool_bound.consecutive_failures == 1


async def test_two_failures_are_a_502_and_nothing_is_tried_a_third_time() -> None:
    n = node(Scripted(status=503), Scripted(status=503), Scripted())
    with pytest.raises(ApiError) as err:
        await n.forward()
    assert err.value.status == 502 and err.value.code == "upstream_error"
    assert len(n.transport.posts) == 2 and len(set(n.transport.posts)) == 2


async def test_a_silent_backend_is_a_504_and_is_never_asked_twice() -> None:
    n = node(Scripted(silent=True), Scripted())
    with pytest.raises(ApiError) as err:
        await n.forward()
    assert err.value.status == 504 and len(n.transport.posts) == 1


async def test_a_stream_is_relayed_in_order_and_a_break_after_bytes_is_an_error_event() -> None:
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
    sse = "text/event-stream"
    n = node(Scripted(chunks=events, content_type=sse, breaks_after=2), Scripted())
    _, route = await n.forward(stream=True)
    sent = bytes(n.wire.sent)
    assert sent.startswith(b"".join(events)) and n.wire.eof
    assert b"event: error" in sent or b'"error"' in sent[len(b"".join(events)) :]
    assert len(n.transport.posts) == 1  # bytes reached the client: never retried
    assert route.backend.consecutive_failures == 1  # the health state machine heard of it


async def test_a_complete_stream_counts_as_a_success() -> None:
    events = [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"]
    n = node(Scripted(chunks=events, content_type="text/event-stream"))
    _, route = await n.forward(stream=True)
    assert bytes(n.wire.sent) == b"".join(events) and route.backend.consecutive_failures == 0
