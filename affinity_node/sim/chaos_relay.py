"""The chaos soak's relay faults (issue 21): answers past the upstream client's 256 KB pause
with small requests reusing the same pooled connections, and a client that never reads a large
answer. The phases themselves are in chaos.py; this module holds their clients, which see the
node from outside only (HTTP, a raw socket, the node's process table)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import psutil

from affinity_node.sim.chaos_fleet import MODEL
from affinity_node.sim.support import scrape, total
from affinity_node.sim.vllm_api import PAD_FIELD

LARGE_ANSWER_BYTES: Final = (300_000, 600_000)
"""Padding of the large answers: past the 256 KB at which the node's upstream client pauses."""
REQUEST_BOUND_S: Final = 5.0
"""A request of the large-answer phase that takes longer counts as hung (a loopback answer
of 600 KB takes milliseconds; the defect hung them for ever)."""
STALLED_ANSWER_BYTES: Final = 16 * 1024 * 1024
"""Past every buffer between the node and a client that does not read (loopback's send buffer
grows to 4 MB; the stalled client's receive buffer is made small)."""
CLOSE_SLACK_S: Final = 1.0
"""Beyond 1.25 x the write timeout (the node checks every quarter of it)."""


@dataclass
class Reply:
    """One bounded request's outcome, as the soak records it."""

    status: int
    """HTTP status; 0 when it did not finish (hung past the bound, or broken)."""
    error: str | None
    backend: str | None
    seconds: float


def chat_body(tenant: str, pad: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "stream": False,
        "max_tokens": 12,
        "messages": [
            {"role": "system", "content": f"Tenant {tenant} rules."},
            {"role": "user", "content": "Say something short."},
        ],
    }
    if pad:
        body[PAD_FIELD] = pad
    return body


async def bounded_chat(
    session: aiohttp.ClientSession, node_url: str, tenant: str, secret: str, pad: int
) -> Reply:
    """A non-streamed chat answer padded by `pad` bytes, which must arrive whole within
    REQUEST_BOUND_S (past it: hung)."""
    start = time.monotonic()
    try:
        async with session.post(
            f"{node_url}/v1/chat/completions",
            json=chat_body(tenant, pad),
            headers={"Authorization": f"Bearer {secret}"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_BOUND_S),
        ) as r:
            backend = r.headers.get("x-backend-id")
            data = await r.read()
    except TimeoutError:
        return Reply(0, f"hung: no whole answer in {REQUEST_BOUND_S:g} s", None, REQUEST_BOUND_S)
    except aiohttp.ClientError as exc:
        return Reply(0, f"{type(exc).__name__}: {exc}", None, time.monotonic() - start)
    seconds = time.monotonic() - start
    if r.status != 200:
        return Reply(r.status, f"HTTP {r.status}: {data[:120]!r}", backend, seconds)
    return Reply(200, _short_answer(data, pad), backend, seconds)


def _short_answer(data: bytes, pad: int) -> str | None:
    """An error when a 200's body is not the whole answer asked for."""
    try:
        content = json.loads(data)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"unreadable answer of {len(data)} bytes"
    if not isinstance(content, str) or len(content) < pad:
        return f"answer shorter than the {pad} bytes asked for"
    return None


@dataclass
class Stall:
    """What became of a client that sent a request and never read its large answer."""

    node: str
    bound_s: float
    status: int = 0
    """The answer's status, from its head (the only part the client reads)."""
    backend: str | None = None
    closed_after_s: float | None = None
    """From the answer's head until the node no longer held the connection; None: not within
    the bound."""
    slot_free: bool = False
    """The node's in-flight count to the answering backend was seen at 0 while the client was
    still stalled (a non-streamed answer frees its backend before it is written)."""
    dropped_counted: float = 0.0
    """The node's 499s (client gone) counted meanwhile."""
    error: str | None = None


async def stall_reader(
    session: aiohttp.ClientSession,
    node_url: str,
    node_pid: int,
    tenant: str,
    secret: str,
    write_timeout_s: float,
    backend_urls: Mapping[str, str],
    meanwhile: Callable[[], Awaitable[None]],
) -> Stall:
    """Sends an authenticated request for a 16 MB answer on a raw socket, reads the answer's
    head and nothing more, runs `meanwhile` (other traffic), and watches the node's process for
    the moment it lets the connection go. `backend_urls`: backend id -> URL (the node's label)."""
    stall = Stall(node_url, write_timeout_s * 1.25 + CLOSE_SLACK_S)
    before = await _dropped(session, node_url)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        port = int(node_url.rsplit(":", 1)[1])
        async with asyncio.timeout(REQUEST_BOUND_S):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, _raw_request(tenant, secret))
            head = await _read_head(loop, sock)
        stalled_at = time.monotonic()
        stall.status, stall.backend = _parse_head(head)
        peer = sock.getsockname()[:2]
        backend_url = backend_urls.get(stall.backend or "", "")
        watch = asyncio.create_task(_watch_slot(session, node_url, backend_url, stall))
        try:
            await meanwhile()
            stall.closed_after_s = await _wait_released(node_pid, port, peer, stalled_at, stall)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
    except (OSError, TimeoutError) as exc:
        stall.error = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    stall.dropped_counted = await _dropped(session, node_url) - before
    return stall


def _raw_request(tenant: str, secret: str) -> bytes:
    body = json.dumps(chat_body(tenant, STALLED_ANSWER_BYTES)).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + secret.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


async def _read_head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await loop.sock_recv(sock, 1024)
        if not chunk:
            raise ConnectionError("the node closed before the answer's head")
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def _parse_head(head: bytes) -> tuple[int, str | None]:
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), fields.get("x-backend-id")


def _node_holds(pid: int, port: int, peer: tuple[str, int]) -> bool:
    """Whether the node's process still has the socket of this client connection."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp4")
    except psutil.Error:
        return False
    return any(
        c.laddr and c.laddr.port == port and c.raddr and (c.raddr.ip, c.raddr.port) == peer
        for c in conns
    )


async def _wait_released(
    pid: int, port: int, peer: tuple[str, int], since: float, stall: Stall
) -> float | None:
    while time.monotonic() - since < stall.bound_s:
        if not await asyncio.to_thread(_node_holds, pid, port, peer):
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    return None


async def _watch_slot(
    session: aiohttp.ClientSession, node_url: str, backend_url: str, stall: Stall
) -> None:
    """Looks for the stalled answer's backend at 0 in flight on this node (other traffic comes
    and goes; a slot held by the stall would keep it at 1 or more)."""
    while not stall.slot_free:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            samples = await scrape(session, f"{node_url}/metrics", timeout_s=1.0)
            key = ("affinity_upstream_inflight", frozenset({("backend", backend_url)}))
            stall.slot_free = samples.get(key) == 0
        await asyncio.sleep(0.05)


async def _dropped(session: aiohttp.ClientSession, node_url: str) -> float:
    try:
        samples = await scrape(session, f"{node_url}/metrics", timeout_s=2.0)
    except (aiohttp.ClientError, TimeoutError):
        return 0.0
    return total(samples, "affinity_http_requests_total", code="499")
