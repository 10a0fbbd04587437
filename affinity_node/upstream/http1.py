"""The forwarding client: HTTP/1.1 over asyncio protocols, with one keep-alive pool per backend.

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
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

BodyParts = tuple[bytes | memoryview, ...]
"""A request body in pieces sent one after the other (a splice without a copy)."""


class UpstreamFailed(Exception):
    """The backend could not be reached or broke the answer; the message says how."""


class UpstreamTimeout(UpstreamFailed):
    """The backend stayed silent for the read timeout."""


class _Unanswered(UpstreamFailed):
    """The connection closed before any byte of an answer: on a reused connection, most likely
    the backend's keep-alive close crossing the request, so one fresh try is safe."""


_PAUSE_AT = 256 * 1024
"""Unread answer bytes past which the socket stops being read (a slow client's stream)."""
_IDLE_SWEEP_S = 5.0


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    ssl: ssl.SSLContext | None
    prefix: str
    head: bytes
    """"Host: ...\\r\\n" and the fixed headers every request carries."""


def _origin(base_url: str, user_agent: str, tls: ssl.SSLContext | None) -> _Origin:
    parts = urlsplit(base_url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) base url: {base_url!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    host_header = netloc if port == default else f"{netloc}:{port}"
    context = (tls or ssl.create_default_context()) if scheme == "https" else None
    head = f"Host: {host_header}\r\nUser-Agent: {user_agent}\r\n".encode("latin-1")
    return _Origin(host, port, context, parts.path.rstrip("/"), head)


class _Connection(asyncio.Protocol):
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

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str, pool: ConnectionPool) -> None:
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
            self.fail(_Unanswered("backend closed the connection before answering"))
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

    def __init__(self, pool: ConnectionPool, conn: _Connection, timeout: float) -> None:
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


class ConnectionPool:
    """Keep-alive connections per backend base URL, most recently used first."""

    def __init__(
        self,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
        user_agent: str = "affinity-node",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: how https backends are verified (default: the system's trusted CAs)."""
        self._connect_timeout = connect_timeout_s
        self._tls = tls
        self._keepalive = keepalive_s
        self._user_agent = user_agent
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._last_sweep = 0.0
        self._closed = False

    def origin(self, base_url: str) -> _Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = _origin(base_url, self._user_agent, self._tls)
        return o

    async def _connect(self, base_url: str, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, base_url, self),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except TimeoutError:
            raise UpstreamFailed(f"no connection in {self._connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamFailed(f"cannot connect ({type(exc).__name__})") from None
        return conn

    async def acquire(self, base_url: str) -> _Connection:
        if self._closed:
            raise UpstreamFailed("client closed")
        idle = self._idle.get(base_url)
        if idle:
            now = idle[-1].loop.time()
            if now - self._last_sweep > _IDLE_SWEEP_S:
                self._sweep(now)
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self._keepalive:
                    self._busy.add(conn)
                    return conn
                conn.abort()
        conn = await self._connect(base_url, self.origin(base_url))
        self._busy.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        """Back to the pool, idle since the answer's last byte (or its first pause): that is
        when the backend's keep-alive clock started, not when a slow client let go."""
        self._busy.discard(conn)
        if self._closed or conn.doomed:
            conn.abort()
            return
        conn.idle_since = conn.paused_at or conn.last_read
        conn.reused = True
        self._idle.setdefault(conn.key, []).append(conn)

    def has(self, base_url: str) -> bool:
        """Whether the pool holds anything for this base URL."""
        return base_url in self._origins or base_url in self._idle

    def forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)

    def discard_idle(self, conn: _Connection) -> None:
        """An idle connection closed (by the backend, or for sending unasked bytes)."""
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def drop(self, base_url: str) -> None:
        """Forgets a backend that left: closes its idle connections now and its busy ones when
        their answers end, so nothing of it stays pooled."""
        self._origins.pop(base_url, None)
        for conn in self._idle.pop(base_url, ()):
            conn.abort()
        for conn in self._busy:
            if conn.key == base_url:
                conn.doomed = True

    def _sweep(self, now: float) -> None:
        """Closes connections idle past the keep-alive (or closed by the backend)."""
        self._last_sweep = now
        for conns in self._idle.values():
            stale = [c for c in conns if c.closed or now - c.idle_since >= self._keepalive]
            for c in stale:
                c.abort()
                conns.remove(c)

    def idle_count(self, base_url: str) -> int:
        return sum(1 for c in self._idle.get(base_url, ()) if not c.closed)

    async def post(
        self,
        base_url: str,
        path: str,
        headers: bytes,
        body: bytes | BodyParts,
        read_timeout_s: float,
        method: str = "POST",
    ) -> Reply:
        """Sends `method path` with the body; returns once the answer's status and headers are
        in. `headers`: extra header lines, each ending in CRLF (see `header_lines`).
        A reused connection that closes before any byte of the answer costs one more try on a
        fresh connection to the same backend (its cache is there), not a backend failure."""
        origin = self.origin(base_url)
        parts: BodyParts = (body,) if isinstance(body, bytes) else body
        length = len(body) if isinstance(body, bytes) else sum(len(p) for p in body)
        head = b"".join((
            method.encode("ascii"), b" ", (origin.prefix + path).encode("latin-1"),
            b" HTTP/1.1\r\n",
            origin.head, headers, b"Content-Length: ", str(length).encode(), b"\r\n\r\n",
        ))  # fmt: skip
        conn = await self.acquire(base_url)
        if conn.reused:
            try:
                return await self._send(conn, head, parts, length, read_timeout_s)
            except _Unanswered:
                conn = await self._connect(base_url, origin)
                self._busy.add(conn)
        return await self._send(conn, head, parts, length, read_timeout_s)

    async def _send(
        self, conn: _Connection, head: bytes, parts: BodyParts, length: int, timeout: float
    ) -> Reply:
        transport = conn.transport
        assert transport is not None
        conn.last_read = conn.loop.time()
        conn.answered = False
        conn.paused_at = 0.0
        reply = Reply(self, conn, timeout)
        conn._reply = reply
        try:
            if length < 16384:  # one small write beats a writev
                transport.write(b"".join((head, *parts)))
            else:  # no copy of a large body
                transport.writelines((head, *parts))
            await reply.head()
        except BaseException:
            reply.close()
            raise
        return reply

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
        for c in self._busy:
            c.abort()
        self._busy.clear()


def header_lines(headers: dict[str, str]) -> bytes:
    """Header lines for `ConnectionPool.post`; ValueError when a name or value holds CR, LF or
    NUL (it could split the request)."""
    text = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    n = len(headers)
    if text.count("\r") != n or text.count("\n") != n or "\0" in text:
        raise ValueError("a header holds a control character")
    return text.encode("latin-1")
