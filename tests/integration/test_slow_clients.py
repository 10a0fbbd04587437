"""Clients that are slow on purpose (issue 21, defect 6): a body that stalls gets 408 and never
reaches a backend; a non-streamed answer to a client that does not read it is dropped after the
write timeout, as a stream is."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from affinity_node.config import BackendConfig, NodeConfig
from tests.support.cluster import MODEL, Cluster, cluster
from tests.support.waiting import wait_for

ROUTE = "/v1/chat/completions"


def head(secret: str, length: int) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + secret.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    """One answer, by its Content-Length (the node may keep reading a refused body's rest for
    a while before it closes, so EOF is not the end of the answer)."""
    head_bytes = await reader.readuntil(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    payload = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(lines[0].split()[1]), json.loads(payload) if payload else {}


def served(node: Cluster, code: str) -> float:
    value = node.nodes[0].metrics_registry.get_sample_value(
        "affinity_http_requests_total", {"route": ROUTE, "code": code}
    )
    return value or 0.0


@pytest.fixture
async def body_timeout_node(dsn: str) -> AsyncIterator[tuple[Cluster, str]]:
    def quick(cfg: NodeConfig) -> None:
        cfg.limits.client_body_read_timeout_seconds = 0.5

    async with cluster(dsn, nodes=1, backends=1, configure=quick) as c:
        yield c, await c.new_key("alice")


async def test_a_body_that_stalls_gets_408_and_reaches_no_backend(body_timeout_node):
    c, secret = body_timeout_node
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", c.nodes[0].port)
    try:
        started = time.monotonic()
        writer.write(head(secret, len(body)) + body[:10])  # ... and nothing more
        await writer.drain()
        status, payload = await asyncio.wait_for(read_response(reader), timeout=10)
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert status == 408, payload
    assert payload["error"]["code"] == "request_timeout"
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert 0.5 <= waited < 5
    assert c.backends[0].stats.requests == 0
    assert served(c, "408") == 1


async def test_a_body_with_pauses_shorter_than_the_timeout_is_served(body_timeout_node):
    """The deadline is per read: a body that keeps coming is not cut off."""
    c, secret = body_timeout_node
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", c.nodes[0].port)
    try:
        writer.write(head(secret, len(body)))
        for i in range(0, len(body), 20):
            writer.write(body[i : i + 20])
            await writer.drain()
            await asyncio.sleep(0.1)  # the client's own pace, under the 0.5 s timeout
        status, payload = await asyncio.wait_for(read_response(reader), timeout=10)
    finally:
        writer.close()
    assert status == 200, payload
    assert c.backends[0].stats.requests == 1


BIG = 16 * 1024 * 1024
"""Past every buffer between the node and a client that does not read (loopback's send
buffer grows to 4 MB here; the client's receive buffer is made small)."""


async def _answering(size: int, header: int = 0) -> AsyncIterator[str]:
    """A real HTTP backend whose non-streamed answers are `size` bytes of padding, with a
    header of `header` bytes (the node passes it on)."""
    answer = json.dumps({"object": "chat.completion", "pad": "x" * size}).encode()
    extra = {"x-padding": "y" * header} if header else {}

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json", headers=extra)

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def _non_reading_client(port: int) -> asyncio.StreamWriter:
    """A connection whose receive buffer is small, from a client that will read nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    _, writer = await asyncio.open_connection(sock=sock)
    return writer


@pytest.fixture
async def big_answers() -> AsyncIterator[str]:
    """16 MB answers."""
    async for url in _answering(BIG):
        yield url


@pytest.fixture(params=["body", "headers"])
async def small_answers(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Answers that fit the node's write buffer, which skips their write timer: 40 KB bodies,
    or small bodies with 60 KB of header lines (counted too, or one answer overflows the
    buffer with no timer armed)."""
    body, header = (40 * 1024, 0) if request.param == "body" else (64, 60 * 1024)
    async for url in _answering(body, header):
        yield url


async def _unread(dsn: str, backend: str, count: int) -> float:
    """`count` requests on one connection from a client that reads nothing, to a node with a
    0.5 s write timeout in front of `backend`. Once the node has dropped the client (one 499,
    the connection closed): how many answers it served."""

    def configure(cfg: NodeConfig) -> None:
        cfg.limits.client_write_timeout_seconds = 0.5
        cfg.backends = [BackendConfig(url=backend, models=[MODEL])]

    async with cluster(dsn, nodes=1, backends=1, configure=configure) as c:
        secret = await c.new_key("alice")
        node = c.nodes[0]
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        one = head(secret, len(body)) + body.encode()
        if count > 1:  # pipelined: the connection stays open after each answer
            one = one.replace(b"Connection: close\r\n", b"")
        writer = await _non_reading_client(node.port)
        try:
            writer.write(one * count)
            await writer.drain()
            await wait_for(lambda: served(c, "499") == 1, timeout=10, what="the reader dropped")
            server = node.runner.server
            assert server is not None
            await wait_for(
                lambda: not server.connections, timeout=5, what="the connection to close"
            )
        finally:
            writer.close()
        return served(c, "200")


async def test_a_client_that_does_not_read_a_large_answer_is_dropped(dsn, big_answers):
    assert await _unread(dsn, big_answers, 1) == 0


async def test_a_client_that_pipelines_small_answers_and_reads_none_is_dropped(dsn, small_answers):
    """Answers that fit the write buffer are written without a timer; a client that sends
    request after request on one connection and reads nothing fills it, and from then on its
    answers are timed again: it is dropped, not held forever."""
    # 400 answers (16 MB or 24 MB): past every buffer on the way.
    ok = await _unread(dsn, small_answers, 400)
    assert 0 < ok < 400, "the first answers went out before the buffers filled"
