"""The forwarding client (upstream/http1.py) against scripted HTTP servers on 127.0.0.1: each
server writes exactly the bytes a test needs, including the ones a well-behaved server never
would (no length, a reset mid-body, garbage, silence)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from affinity_node.sim.support import free_port
from affinity_node.upstream.client import UpstreamClient, UpstreamTimeouts
from affinity_node.upstream.http1 import UpstreamFailed, UpstreamTimeout
from affinity_node.upstream.keepalive import ConnectionPool, header_lines
from tests.support.tools import require_tool
from tests.support.waiting import wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
NO_HEADERS = header_lines({})


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.closed = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.url = ""
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        srv.close()
        for w in server.writers:
            w.transport.abort()
        for t in server.tasks:
            t.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(connect_timeout_s=2.0)
    yield p
    await p.close()


def keep_alive_server(server_box: list[Server]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            server_box[0].requests.append((head, body))
            writer.write(answer(b"echo:" + body, b"Content-Type: text/plain\r\n"))
            await writer.drain()

    return handler


async def test_answers_come_back_and_the_connection_is_reused(pool):
    box: list[Server] = []
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        for n in range(3):
            lines = header_lines({"x-request-id": f"r{n}", "Content-Type": "application/json"})
            async with await pool.post(server.url, "/v1/x", lines, b"{}", 5.0) as reply:
                assert reply.status == 200
                assert reply.headers["content-type"] == "text/plain"
                assert await reply.read() == b"echo:{}"
        assert server.connections == 1
        assert pool.idle_count(server.url) == 1
        head, _ = server.requests[2]
        assert head.startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"\r\nx-request-id: r2\r\n" in head
        assert f"\r\nHost: {server.url.removeprefix('http://')}\r\n".encode() in head


async def test_a_large_body_goes_up_whole(pool):
    box: list[Server] = []
    body = b"x" * 300_000
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        async with await pool.post(server.url, "/", NO_HEADERS, body, 5.0) as reply:
            assert await reply.read() == b"echo:" + body


async def test_a_backend_that_closed_an_idle_connection_costs_a_new_one_not_an_error(pool):
    async def one_per_connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(b"ok"))
        await w.drain()  # then close: a keep-alive timeout on the backend's side

    async with serving(one_per_connection) as server:
        for _ in range(3):
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                assert await reply.read() == b"ok"
            await wait_for(lambda: server.closed == server.connections, timeout=5)
            await wait_for(lambda: pool.idle_count(server.url) == 0, timeout=5)
        assert server.connections == 3


async def test_connection_close_from_the_backend_is_not_pooled(pool):
    async def closing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(b"bye", b"Connection: close\r\n"))
        await w.drain()
        await r.read()  # waits for the client to hang up

    async with serving(closing) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"bye"
        assert pool.idle_count(server.url) == 0
        await wait_for(lambda: server.closed == 1, timeout=5)


async def test_a_body_without_length_ends_with_the_connection(pool):
    async def http10(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await w.drain()
        w.write(b"part two")
        await w.drain()

    async with (
        serving(http10) as server,
        await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply,
    ):
        assert await reply.read() == b"part one, part two"


async def test_chunks_arrive_as_they_are_sent(pool):
    step = asyncio.Event()

    async def chunked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await w.drain()
        await step.wait()
        w.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await w.drain()
        await r.read()

    async with serving(chunked) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.readany() == b"data: 1\n\n"  # before the second was written
            step.set()
            assert await reply.readany() == b"data: 2\n\n"
            assert await reply.readany() == b""
        assert pool.idle_count(server.url) == 1


async def test_a_silent_backend_times_out_and_its_connection_is_dropped(pool):
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()  # never answers; returns when the client hangs up

    async with serving(silent) as server:
        with pytest.raises(UpstreamTimeout):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 0.2)
        await wait_for(lambda: server.closed == 1, timeout=5)
        assert pool.idle_count(server.url) == 0


async def test_silence_between_chunks_times_out_the_read(pool):
    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await w.drain()
        await r.read()

    async with (
        serving(stalls) as server,
        await pool.post(server.url, "/", NO_HEADERS, b"{}", 0.2) as reply,
    ):
        assert await reply.readany() == b"hi"
        with pytest.raises(UpstreamTimeout):
            await reply.readany()


async def test_bytes_the_node_holds_unread_do_not_count_as_silence(pool):
    """A slow client: the node reads a stream late; the backend finished long ago."""
    big = b"y" * 600_000  # past the pause threshold: the socket stops being read

    async def fast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(big, b"Content-Type: text/event-stream\r\n"))
        await w.drain()
        await r.read()

    async with (
        serving(fast) as server,
        await pool.post(server.url, "/", NO_HEADERS, b"{}", 0.2) as reply,
    ):
        await asyncio.sleep(0.6)  # the slow client under test, three timeouts long
        got = b""
        while chunk := await reply.readany():
            got += chunk
        assert got == big


async def test_a_reset_mid_body_fails_the_read(pool):
    async def resets(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await w.drain()
        w.transport.abort()

    async with serving(resets) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            with pytest.raises(UpstreamFailed) as err:
                await reply.read()
        assert not isinstance(err.value, UpstreamTimeout)
        assert pool.idle_count(server.url) == 0


async def test_a_connection_closed_before_any_answer_fails_the_request(pool):
    async def hangs_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)

    async with serving(hangs_up) as server:
        with pytest.raises(UpstreamFailed, match="closed the connection"):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0)


async def test_garbage_instead_of_http_fails_the_request(pool):
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await w.drain()
        await r.read()

    async with serving(garbage) as server:
        with pytest.raises(UpstreamFailed, match="malformed"):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0)


async def test_nothing_listening_fails_fast(pool):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        await pool.post(url, "/", NO_HEADERS, b"{}", 5.0)


async def test_leaving_an_answer_early_closes_its_connection(pool):
    async def endless(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            w.write(b"2\r\nab\r\n")
            await w.drain()
            await asyncio.sleep(0.01)

    async with serving(endless) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.readany()
        await wait_for(lambda: server.closed == 1, timeout=5)  # the backend saw it go
        assert pool.idle_count(server.url) == 0


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(pool):
    got = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        got.set()
        await r.read()

    async with serving(slow) as server:
        task = asyncio.create_task(pool.post(server.url, "/", NO_HEADERS, b"{}", 30.0))
        await asyncio.wait_for(got.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: server.closed == 1, timeout=5)
        assert pool.idle_count(server.url) == 0


async def test_an_informational_answer_is_skipped(pool):
    async def early_hints(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + answer(b"real"))
        await w.drain()
        await r.read()

    async with (
        serving(early_hints) as server,
        await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply,
    ):
        assert reply.status == 200
        assert "link" not in reply.headers
        assert await reply.read() == b"real"


def test_header_values_that_could_split_a_request_are_refused():
    with pytest.raises(ValueError):
        header_lines({"x-request-id": "a\r\nHost: evil"})
    with pytest.raises(ValueError):
        header_lines({"x-a\nb": "c"})
    assert header_lines({"a": "b", "c": "d"}) == b"a: b\r\nc: d\r\n"


async def test_a_second_unasked_answer_spoils_the_connection_not_the_first(pool):
    async def double(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(b"one") + answer(b"two"))
        await w.drain()
        await r.read()

    async with serving(double) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"one"
        assert pool.idle_count(server.url) == 0
        await wait_for(lambda: server.closed == 1, timeout=5)


@pytest.mark.parametrize("size", [10, 300_000], ids=["small", "large"])
async def test_a_body_in_pieces_arrives_as_one(pool, size):
    box: list[Server] = []
    tail = b'"x":"' + b"y" * size + b'"}'
    parts = (b"{", b'"stream_options":{"include_usage":true},', memoryview(b"{" + tail)[1:])
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        async with await pool.post(server.url, "/", NO_HEADERS, parts, 5.0) as reply:
            assert await reply.read() == b"echo:" + b"".join(parts)


async def test_a_connection_idle_past_the_reuse_limit_is_replaced():
    """The limit sits under the backend's keep-alive, so the node never reuses a connection the
    backend may be closing at that very moment."""
    box: list[Server] = []
    pool = ConnectionPool(connect_timeout_s=2.0, keepalive_s=0.05)
    try:
        async with serving(keep_alive_server(box)) as server:
            box.append(server)
            for _ in range(2):
                async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                    await reply.read()
            assert server.connections == 1  # back to back: reused
            await asyncio.sleep(0.1)  # the idle time under test, twice the limit
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                await reply.read()
            assert server.connections == 2
            await wait_for(lambda: server.closed == 1, timeout=5)  # the stale one was closed
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1 (openssl's command line)."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "k.pem", "r.csr", "c.pem"))
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=affinity test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return ca, cert, key


async def test_https_backends_are_verified(tls_files):
    ca, cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    box: list[Server] = []
    server = Server(keep_alive_server(box))
    box.append(server)
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    trusting = ConnectionPool(connect_timeout_s=2.0, tls=ssl.create_default_context(cafile=ca))
    system = ConnectionPool(connect_timeout_s=2.0)  # does not know the test CA
    try:
        async with await trusting.post(url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"echo:{}"
        with pytest.raises(UpstreamFailed, match="cannot connect"):
            await system.post(url, "/", NO_HEADERS, b"{}", 5.0)
    finally:
        await trusting.close()
        await system.close()
        for w in server.writers:
            w.transport.abort()
        srv.close()
        await asyncio.gather(*server.tasks, return_exceptions=True)


def reset(w: asyncio.StreamWriter) -> None:
    """Closes with a TCP reset (RST), as a crashed or killed backend does: not a clean FIN."""
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


async def test_a_large_answer_read_whole_leaves_a_connection_that_answers_again(pool):
    """Issue 21 (1): a non-streamed answer past the pause threshold used to go back to the
    pool with reading paused, and the next request on it waited forever."""
    box: list[Server] = []
    big = b"z" * 300_000
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        async with asyncio.timeout(10):
            for n in range(3):
                async with await pool.post(server.url, "/", NO_HEADERS, big, 5.0) as reply:
                    assert await reply.read() == b"echo:" + big
                async with await pool.post(server.url, "/", NO_HEADERS, b"%d" % n, 5.0) as r:
                    assert await r.read() == b"echo:%d" % n
        assert server.connections == 1  # every request reused the one connection


async def test_a_stream_the_node_paused_resumes_when_its_reader_waits(pool):
    """A slow client left more than the pause threshold unread; the rest still arrives and the
    connection answers the next request."""
    box: list[Server] = []
    big = b"s" * 700_000
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        async with asyncio.timeout(10):
            async with await pool.post(server.url, "/", NO_HEADERS, big, 5.0) as reply:
                got = [await reply.readany()]
                while chunk := await reply.readany():
                    got.append(chunk)
                assert b"".join(got) == b"echo:" + big
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                assert await reply.read() == b"echo:{}"


async def test_idle_time_counts_from_the_last_byte_not_from_release():
    """Issue 21 (4): a slow client held a finished stream past the reuse limit; the backend's
    keep-alive clock ran all that time, so the connection is too old to reuse."""
    box: list[Server] = []
    pool = ConnectionPool(connect_timeout_s=2.0, keepalive_s=0.3)
    try:
        async with serving(keep_alive_server(box)) as server:
            box.append(server)
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                assert await reply.read() == b"echo:{}"
                await asyncio.sleep(0.6)  # the slow client under test, twice the limit
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                assert await reply.read() == b"echo:{}"
            assert server.connections == 2
    finally:
        await pool.close()


async def test_idle_time_of_a_paused_stream_counts_from_the_pause():
    """The backend finished while its bytes waited in socket buffers for a slow client: its
    keep-alive clock started then, long before the node read the last byte."""
    big = b"p" * 2_000_000
    sent = asyncio.Event()

    async def fast(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(answer(big))
            await w.drain()
            sent.set()

    pool = ConnectionPool(connect_timeout_s=2.0, keepalive_s=0.3)
    try:
        async with serving(fast) as server:
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                await asyncio.wait_for(sent.wait(), 5)  # all of it left the backend
                await asyncio.sleep(0.6)  # the slow client under test, twice the limit
                got = 0
                while chunk := await reply.readany():
                    got += len(chunk)
                assert got == len(big)
            async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
                await reply.read()
            assert server.connections == 2
    finally:
        await pool.close()


def closes_the_second_request_on_first_connections(how: str, fresh_too: bool = False) -> Handler:
    """Answers once per connection, then closes when the next request comes: the backend's
    keep-alive close crossing a request. `fresh_too`: new connections close unanswered too."""
    seen = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal seen
        seen += 1
        if seen == 1 or not fresh_too:
            await read_request(r)
            w.write(answer(b"ok"))
            await w.drain()
        await read_request(r)
        if how == "reset":
            reset(w)
        else:
            w.close()

    return handler


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_reused_connection_closed_before_answering_is_retried_on_a_fresh_one(pool, how):
    """Issue 21 (4): not a backend failure: the same backend answers on a new connection."""
    async with serving(closes_the_second_request_on_first_connections(how)) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        assert server.connections == 2


async def test_a_fresh_connection_closed_before_answering_is_a_failure_after_one_retry(pool):
    handler = closes_the_second_request_on_first_connections("fin", fresh_too=True)
    async with serving(handler) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        with pytest.raises(UpstreamFailed, match="closed the connection"):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0)
        assert server.connections == 2  # one retry, not a loop
        assert pool.idle_count(server.url) == 0


async def test_a_reused_connection_that_answered_in_part_is_not_retried(pool):
    requests = 0

    async def half(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal requests
        await read_request(r)
        requests += 1
        w.write(answer(b"ok"))
        await w.drain()
        await read_request(r)
        requests += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await w.drain()
        w.close()

    async with serving(half) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        with pytest.raises(UpstreamFailed):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0)
        assert (server.connections, requests) == (1, 2)


async def test_a_timeout_on_a_reused_connection_is_not_retried(pool):
    async def then_silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(b"ok"))
        await w.drain()
        await read_request(r)
        await r.read()

    async with serving(then_silent) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        with pytest.raises(UpstreamTimeout):
            await pool.post(server.url, "/", NO_HEADERS, b"{}", 0.2)
        assert server.connections == 1


async def test_a_reset_during_a_body_without_length_is_a_truncated_answer(pool):
    """Issue 21 (5): only a clean close (FIN) ends such a body; a reset (RST) cut it short."""
    first_read = asyncio.Event()

    async def resets(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await w.drain()
        await first_read.wait()
        reset(w)

    async with serving(resets) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.readany() == b"part one, "
            first_read.set()
            with pytest.raises(UpstreamFailed, match="truncated") as err:
                await reply.read()
        assert not isinstance(err.value, UpstreamTimeout)
        assert pool.idle_count(server.url) == 0


async def test_part_of_a_second_answer_after_a_complete_one_keeps_the_connection_out(pool):
    """Issue 21 (5): the parser would sit mid-message and misread the next answer."""
    box: list[Server] = []

    async def trailing(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if box[0].connections == 1:
            await read_request(r)
            w.write(answer(b"one") + b"HTTP/1.1 2")
            await w.drain()
        await keep_alive_server(box)(r, w)

    async with serving(trailing) as server:
        box.append(server)
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"one"
        assert pool.idle_count(server.url) == 0
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"echo:{}"
        assert server.connections == 2


async def test_bytes_on_an_idle_connection_close_and_discard_it(pool):
    answered = asyncio.Event()
    chatter = asyncio.Event()

    async def chatty(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(answer(b"ok"))
        await w.drain()
        answered.set()
        await chatter.wait()
        w.write(b"HTTP/1.1 200 OK\r\n")  # nobody asked
        await w.drain()
        await r.read()

    async with serving(chatty) as server:
        async with await pool.post(server.url, "/", NO_HEADERS, b"{}", 5.0) as reply:
            assert await reply.read() == b"ok"
        assert pool.idle_count(server.url) == 1
        chatter.set()
        await wait_for(lambda: server.closed == 1, timeout=5, what="the node hung up")
        await wait_for(lambda: not pool._idle.get(server.url), timeout=5, what="discarded")


async def test_drop_closes_idle_connections_now_and_busy_ones_when_released(pool):
    box: list[Server] = []
    async with serving(keep_alive_server(box)) as server:
        box.append(server)
        async with await pool.post(server.url, "/", NO_HEADERS, b"a", 5.0) as reply:
            await reply.read()
        busy = await pool.post(server.url, "/", NO_HEADERS, b"b", 5.0)  # reuses the idle one
        async with await pool.post(server.url, "/", NO_HEADERS, b"c", 5.0) as reply:
            await reply.read()  # a second connection, idle now
        assert (server.connections, pool.idle_count(server.url)) == (2, 1)
        pool.drop(server.url)
        assert pool.idle_count(server.url) == 0
        assert server.url not in pool._origins
        await wait_for(lambda: server.closed == 1, timeout=5, what="the idle one closed")
        async with busy:
            assert await busy.read() == b"echo:b"  # an answer in flight ends normally
        assert pool.idle_count(server.url) == 0
        await wait_for(lambda: server.closed == 2, timeout=5, what="the busy one closed")
        async with await pool.post(server.url, "/", NO_HEADERS, b"d", 5.0) as reply:
            assert await reply.read() == b"echo:d"  # a backend that comes back is served
        assert pool.idle_count(server.url) == 1


async def test_forget_backend_drops_the_forwarding_connections():
    box: list[Server] = []
    client = UpstreamClient(UpstreamTimeouts(connect_s=2.0))
    try:
        async with serving(keep_alive_server(box)) as server:
            box.append(server)
            async with await client.post(server.url, "/v1/x", b"{}", {}, stream=False) as r:
                assert await r.read() == b"echo:{}"
            client.forget_backend(server.url)
            await wait_for(lambda: server.closed == 1, timeout=5, what="the backend saw it go")
    finally:
        await client.close()
