"""The forwarding client: HTTP/1.1 over asyncio protocols. This module is one connection and
its answer; keepalive.py holds the keep-alive pool per backend that sends requests on them.

aiohttp's ClientSession cost about a third of a bare forwarder's CPU per request (a task, a
timer re-armed on every read, a StreamReader, a URL object and a cookie jar per request); the
node sends every request to a base URL it already parsed, so it needs none of that. This
client writes the request head with one format, parses the answer with llhttp (httptools),
hands body bytes over as they arrive, and times silences with one timer per request that only
re-arms when it fires early. Health probes and discovery keep using aiohttp (client.py).

Semantics the forwarder relies on:
- `UpstreamTimeout`: the backend accepted the request and then sent nothing for the read
  timeout (counted while the reader waits, not while the node holds unread data).
- `UpstreamFailed`: no connection in the connect timeout, a refused or reset connection, a
  connection closed before the answer ended (a reset ends even a body without length), or an
  answer llhttp rejects.
- A connection goes back to the pool only after a complete answer that allows keep-alive and
  nothing after it, and never paused; closing an answer early (a client that went away) aborts
  it, so the backend stops work. Bytes on an idle connection close and discard it.
- Idle time counts from the answer's last byte (from the pause, if the node paused it: the
  backend's keep-alive clock may have started while its bytes waited in socket buffers).
- A request on a reused connection that closes before any byte of an answer (the backend's
  keep-alive close crossing the request) is sent once more on a fresh connection.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

BodyParts = tuple[bytes | memoryview, ...]
"""A request body in pieces sent one after the other (a splice without a copy)."""


class UpstreamFailed(Exception):
    """The backend could not be reached or broke the answer; the message says how."""


class UpstreamTimeout(UpstreamFailed):
    """The backend stayed silent for the read timeout."""


class Unanswered(UpstreamFailed):
    """The connection closed before any byte of an answer: on a reused connection, most likely
    the backend's keep-alive close crossing the request, so one fresh try is safe."""


_PAUSE_AT = 256 * 1024
"""Unread answer bytes past which the socket stops being read (a slow client's stream)."""


class Pooling(Protocol):
    """What a connection and its answer tell their pool (keepalive.ConnectionPool)."""

    def release(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...

    def discard_idle(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one answer in flight on it."""

    __slots__ = (
        "_reply",
        "_status_fields",
        "answered",
        "closed",
        "doomed",
        "idle_since",
        "key",
        "last_read",
        "loop",
        "parser",
        "paused",
        "paused_at",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str, pool: Pooling) -> None:
        self.loop = loop
        self.key = key
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self._reply: Reply | None = None
        self._status_fields: list[tuple[str, str]] = []
        self.closed = False
        self.paused = False
        self.reused = False
        """It has been back in the pool: a failure before any answer may be a keep-alive race."""
        self.doomed = False
        """Its backend was dropped: close it when released."""
        self.answered = False
        """A byte of the current request's answer arrived."""
        self.idle_since = 0.0
        self.last_read = 0.0
        """When the last bytes arrived (or the current request went out)."""
        self.paused_at = 0.0
        """When reading was first paused during the current answer; 0.0 if it was not."""

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        self.answered = True
        reply = self._reply
        if reply is None or reply.complete:  # bytes nobody asked for: never trust it again
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamFailed("backend switched protocols"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamFailed(f"malformed answer ({exc})"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reply = self._reply
        if reply is None:
            self.pool.discard_idle(self)
            return
        if reply.complete:
            return
        if reply.status and reply.until_eof and exc is None:
            reply.finish()  # a body without length or chunking ends where the connection does
            return
        if not self.answered:
            self.fail(Unanswered("backend closed the connection before answering"))
        elif reply.status and reply.until_eof:
            self.fail(UpstreamFailed("backend reset the connection: the answer is truncated"))
        else:
            self.fail(UpstreamFailed("backend closed the connection"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        reply = self._reply
        if reply is None or reply.complete:  # bytes after the answer: never in sync again
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._status_fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        reply = self._reply
        assert reply is not None
        status = self.parser.get_status_code()
        fields, self._status_fields = self._status_fields, []
        if status < 200:  # 1xx: informational, the real answer follows
            return
        if reply.status:
            raise ValueError("a second answer to one request")  # feed_data raises; fail()
        headers = CIMultiDictProxy(CIMultiDict(fields))
        reply.until_eof = "content-length" not in headers and "transfer-encoding" not in headers
        reply.headed(status, headers)

    def on_body(self, body: bytes) -> None:
        reply = self._reply
        assert reply is not None
        reply.feed(body)

    def on_message_complete(self) -> None:
        reply = self._reply
        if reply is not None and reply.status:
            reply.keep_alive = self.parser.should_keep_alive()
            reply.finish()

    # -- for Reply and the pool ---------------------------------------------------------------

    def fail(self, exc: UpstreamFailed) -> None:
        reply = self._reply
        self.abort()
        if reply is not None:
            reply.fail(exc)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self.paused and not self.closed and self.transport is not None:
            self.paused = True
            if not self.paused_at:
                self.paused_at = self.loop.time()
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()

    def reusable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()


class Reply:
    """An answer being received: status and headers first, then the body as it arrives.
    Use as `async with`; leaving it early closes the connection."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_error",
        "_pool",
        "_size",
        "_timeout",
        "_timer",
        "_wait_since",
        "_waiter",
        "_whole",
        "complete",
        "headers",
        "keep_alive",
        "status",
        "until_eof",
    )

    def __init__(self, pool: Pooling, conn: Connection, timeout: float) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = timeout
        self._chunks: list[bytes] = []
        self._size = 0
        self._error: UpstreamFailed | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wait_since = 0.0
        self._whole = False
        """read() keeps the whole body anyway: pausing the socket would only stall it."""
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        loop = conn.loop
        self._timer: asyncio.TimerHandle | None = loop.call_at(
            conn.last_read + timeout, self._silence_check
        )

    # -- fed by the connection ----------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def headed(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.headers = headers
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _PAUSE_AT and not self._whole:
            self._conn.pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._stop_timer()
        self._conn.resume()  # nothing more is due: whatever arrives now spoils the connection
        self._wake()

    def fail(self, exc: UpstreamFailed) -> None:
        if self._error is None and not self.complete:
            self._error = exc
        self._stop_timer()
        self._wake()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _silence_check(self) -> None:
        """Fires at the earliest moment the backend could have been silent for the timeout:
        silence counts from the later of its last bytes and the reader starting to wait."""
        conn = self._conn
        loop = conn.loop
        now = loop.time()
        if self._waiter is None:  # the node is not waiting for bytes (it holds unread ones)
            self._timer = loop.call_at(now + self._timeout, self._silence_check)
            return
        due = max(conn.last_read, self._wait_since) + self._timeout
        if now < due:
            self._timer = loop.call_at(due, self._silence_check)
            return
        self._timer = None
        conn.fail(UpstreamTimeout(f"backend silent for {self._timeout:g} s"))

    # -- for the forwarder --------------------------------------------------------------------

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        conn = self._conn
        conn.resume()  # a reader waiting on a paused socket would wait forever
        loop = conn.loop
        waiter = loop.create_future()
        self._waiter = waiter
        self._wait_since = loop.time()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    async def head(self) -> None:
        while not self.status:
            await self._wait()

    @property
    def drained(self) -> bool:
        """The answer is complete and every byte of it was read: the next readany is b""."""
        return self.complete and not self._chunks

    async def readany(self) -> bytes:
        """The body bytes received since the last call; b"" once the answer is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        self._conn.resume()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        self._whole = True
        while not self.complete:
            await self._wait()
        chunks = self._chunks
        self._chunks = []
        self._size = 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        self._stop_timer()
        conn = self._conn
        conn._reply = None
        if (
            self.complete
            and self.keep_alive
            and self._error is None
            and not conn.paused
            and conn.reusable()
        ):
            self._pool.release(conn)
        else:
            conn.abort()
            self._pool.forget(conn)

    async def __aenter__(self) -> Reply:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
