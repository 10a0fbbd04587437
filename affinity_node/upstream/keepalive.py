"""The keep-alive pool of the forwarding client: connections per backend base URL, most
recently used first, and the request that goes out on one (http1.py is the connection and its
answer)."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from affinity_node.upstream.http1 import (
    BodyParts,
    Connection,
    Reply,
    Unanswered,
    UpstreamFailed,
)

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
        self._idle: dict[str, list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._last_sweep = 0.0
        self._closed = False

    def origin(self, base_url: str) -> _Origin:
        o = self._origins.get(base_url)
        if o is None:
            o = self._origins[base_url] = _origin(base_url, self._user_agent, self._tls)
        return o

    async def _connect(self, base_url: str, origin: _Origin) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop, base_url, self),
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

    async def acquire(self, base_url: str) -> Connection:
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

    def release(self, conn: Connection) -> None:
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

    def forget(self, conn: Connection) -> None:
        self._busy.discard(conn)

    def discard_idle(self, conn: Connection) -> None:
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
        retry = conn.reused
        while True:  # one coroutine, no helper awaited: the hot path resumes one frame less
            reply = self._send(conn, head, parts, length, read_timeout_s)
            try:
                await reply.head()
            except BaseException as exc:
                reply.close()
                if not (retry and isinstance(exc, Unanswered)):
                    raise
                retry = False
                conn = await self._connect(base_url, origin)
                self._busy.add(conn)
                continue
            return reply

    def _send(
        self, conn: Connection, head: bytes, parts: BodyParts, length: int, timeout: float
    ) -> Reply:
        """Writes the request; returns the Reply that waits for its answer (closed here if the
        write fails, by the caller if the wait does)."""
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
    text = "".join(map("%s: %s\r\n".__mod__, headers.items()))  # no Python frame per call
    n = len(headers)
    if text.count("\r") != n or text.count("\n") != n or "\0" in text:
        raise ValueError("a header holds a control character")
    return text.encode("latin-1")
