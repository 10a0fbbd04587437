"""Reading a request: its body within the limits, and the client headers that go upstream."""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader, web

from affinity_node.config import LimitsConfig
from affinity_node.http.errors import ApiError


def _too_large() -> ApiError:
    return ApiError(
        413, "Request body too large.", "invalid_request_error", None, "request_too_large"
    )


async def read_body(request: web.Request, limits: LimitsConfig) -> bytes:
    """The body, within limits.max_body_bytes. aiohttp's request.read() copies a body twice
    (into a bytearray, then to bytes); this joins the received chunks once, which is a few
    percent of the node's CPU at 200 KB. A declared length over the limit is refused unread.
    A read that has to wait for the client is bounded by limits.client_body_read_timeout_seconds
    (408); reads of bytes already received arm no timer."""
    limit = limits.max_body_bytes
    if (request.content_length or 0) > limit:
        raise _too_large()
    content = request.content
    if content.is_eof() and content.total_bytes <= limit:
        return content.read_nowait()  # all of it arrived with the head: no await, one join
    chunks: list[bytes] = []
    size = 0
    while True:
        if content.total_bytes == size and not content.is_eof():  # nothing buffered: waits
            chunk = await _read_waiting(content, limits.client_body_read_timeout_seconds)
        else:
            chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large()
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_waiting(content: StreamReader, timeout: float) -> bytes:
    try:
        async with asyncio.timeout(timeout):
            return await content.readany()
    except TimeoutError:
        raise ApiError(
            408,
            f"The request body stalled: no bytes for {timeout:g} s.",
            "invalid_request_error",
            None,
            "request_timeout",
            headers={"Connection": "close"},
        ) from None


def check_forwarded_headers(request: web.Request) -> None:
    """Client headers the node passes upstream go out as latin-1 header lines: anything not
    ASCII is refused here, before routing, rather than failing on its way to a backend.
    (x-request-id is replaced instead, in the middleware; x-session-id is only hashed.)"""
    value = request.headers.get("Accept-Encoding")
    if value is not None and not value.isascii():
        raise ApiError(
            400,
            "The Accept-Encoding header must be ASCII.",
            "invalid_request_error",
            None,
            "invalid_header_value",
        )
