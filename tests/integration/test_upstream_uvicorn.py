"""The forwarding client (upstream/http1.py) against a real uvicorn, the server vLLM runs on,
with both of its HTTP implementations (httptools, as vLLM installs it, and h11) and a short
keep-alive (1 s) so that its idle close meets the node's reuse inside a test."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from affinity_node.upstream.http1 import UpstreamTimeout
from affinity_node.upstream.keepalive import ConnectionPool, header_lines
from tests.support.waiting import wait_for

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NO_HEADERS = header_lines({})
KEEP_ALIVE_S = 1
LARGE = json.dumps({"data": "L" * 600_000}).encode()  # past the client's pause threshold
EVENTS = [b'data: {"n": %d, "text": "%s"}\n\n' % (n, b"t" * n) for n in range(60)] + [
    b"data: [DONE]\n\n"
]


async def _json(send: Send, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Backend:
    """A tiny vLLM-shaped ASGI app; `ports` holds the client port of every request (one per
    connection the node opened)."""

    ports: list[int] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        self.ports.append(scope["client"][1])
        path = scope["path"]
        if path == "/large":
            await _json(send, LARGE)
        elif path == "/stream":
            start = {"type": "http.response.start", "status": 200}
            await send({**start, "headers": [(b"content-type", b"text/event-stream")]})
            for event in EVENTS:  # no length: uvicorn sends it chunked
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/slow":
            await asyncio.sleep(float(scope["query_string"] or b"0.5"))  # the server's work
            await _json(send, b'{"slow": true}')
        else:
            await _json(send, b'{"size": %d}' % size)


@dataclass
class Running:
    url: str
    backend: Backend
    server: Any

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)


def _wait_blocking(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Waits on a condition WITHOUT running the event loop: the node sees nothing meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(params=["httptools", "h11"])
async def uvicorn_backend(request: pytest.FixtureRequest) -> AsyncIterator[Running]:
    backend = Backend()
    config = uvicorn.Config(
        backend,
        host="127.0.0.1",
        port=0,
        http=request.param,
        loop="asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        _wait_blocking(lambda: server.started or not thread.is_alive(), 10, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield Running(f"http://127.0.0.1:{port}", backend, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    """Reuse under the server's keep-alive, as the node's 4 s sit under uvicorn's 5 s."""
    p = ConnectionPool(connect_timeout_s=2.0, keepalive_s=KEEP_ALIVE_S * 0.8)
    yield p
    await p.close()


async def test_large_answers_then_reuse_never_hang(uvicorn_backend, pool):
    url = uvicorn_backend.url
    async with asyncio.timeout(15):
        for n in range(3):
            async with await pool.post(url, "/large", NO_HEADERS, b"{}", 5.0) as reply:
                assert reply.status == 200
                assert await reply.read() == LARGE
            body = b'{"n": %d}' % n
            async with await pool.post(url, "/json", NO_HEADERS, body, 5.0) as reply:
                assert json.loads(await reply.read()) == {"size": len(body)}
    assert len(set(uvicorn_backend.backend.ports)) == 1  # one connection, reused throughout


async def test_a_large_answer_read_late_then_reuse(uvicorn_backend, pool):
    """A slow client's stream: the node stops reading past the threshold, then catches up."""
    url = uvicorn_backend.url
    async with asyncio.timeout(15):
        async with await pool.post(url, "/large", NO_HEADERS, b"{}", 5.0) as reply:
            conn = reply._conn
            await wait_for(lambda: conn.paused, timeout=5, what="the node to pause reading")
            got = []
            while chunk := await reply.readany():
                got.append(chunk)
            assert b"".join(got) == LARGE
        async with await pool.post(url, "/json", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b'{"size": 2}'


async def test_reuse_across_the_servers_idle_close_never_surfaces_an_error(uvicorn_backend):
    """The keep-alive race at its worst: the node reuses a connection uvicorn has already
    closed and the node has not noticed yet (its loop was busy). The request goes out on it,
    fails before any answer, and is sent again on a fresh connection: no error."""
    url = uvicorn_backend.url
    late = ConnectionPool(connect_timeout_s=2.0, keepalive_s=30.0)  # outlives the server's
    try:
        for n in range(2):
            async with await late.post(url, "/json", NO_HEADERS, b"{}", 5.0) as reply:
                assert await reply.read() == b'{"size": 2}'
            _wait_blocking(
                lambda: uvicorn_backend.open_connections() == 0, 10, "uvicorn's idle close"
            )
            assert late.idle_count(url) == 1  # the node still holds it as idle
            async with await late.post(url, "/json", NO_HEADERS, b"[1]", 5.0) as reply:
                assert await reply.read() == b'{"size": 3}'
            # the retry's fresh connection, then pooled, serves the next round's first request
            assert len(set(uvicorn_backend.backend.ports)) == n + 2
    finally:
        await late.close()


async def test_an_idle_close_the_node_saw_costs_a_new_connection(uvicorn_backend):
    url = uvicorn_backend.url
    late = ConnectionPool(connect_timeout_s=2.0, keepalive_s=30.0)
    try:
        async with await late.post(url, "/json", NO_HEADERS, b"{}", 5.0) as reply:
            await reply.read()
        await wait_for(lambda: late.idle_count(url) == 0, timeout=10, what="the close seen")
        async with await late.post(url, "/json", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b'{"size": 2}'
        assert len(set(uvicorn_backend.backend.ports)) == 2
    finally:
        await late.close()


async def test_streams_relay_completely_and_leave_a_reusable_connection(uvicorn_backend, pool):
    url = uvicorn_backend.url
    async with asyncio.timeout(15):
        for _ in range(2):
            async with await pool.post(url, "/stream", NO_HEADERS, b"{}", 5.0) as reply:
                assert reply.headers["transfer-encoding"] == "chunked"
                got = []
                while chunk := await reply.readany():
                    got.append(chunk)
                assert b"".join(got) == b"".join(EVENTS)
                assert reply.drained
            assert pool.idle_count(url) == 1
    assert len(set(uvicorn_backend.backend.ports)) == 1


async def test_a_slow_answer_times_out_only_past_the_read_timeout(uvicorn_backend, pool):
    url = uvicorn_backend.url
    async with asyncio.timeout(15):
        with pytest.raises(UpstreamTimeout):
            await pool.post(url, "/slow?1.0", NO_HEADERS, b"{}", 0.2)
        async with await pool.post(url, "/slow?0.3", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b'{"slow": true}'
