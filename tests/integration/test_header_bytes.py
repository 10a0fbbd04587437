"""Header bytes that are not ASCII (issue 21, defect 3): each gets a 4xx OpenAI error body or a
harmless replacement, never a 500 and never a traceback in the log.

aiohttp decodes header bytes as UTF-8 with surrogate escapes, and the upstream client writes
header lines as latin-1, so these are sent on raw sockets, byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.cluster import MODEL, Cluster, cluster

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
async def one_node(dsn: str) -> AsyncIterator[tuple[Cluster, str]]:
    async with cluster(dsn, nodes=1, backends=1) as c:
        yield c, await c.new_key("alice")


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    assert "Traceback" not in caplog.text


async def post_raw(port: int, headers: list[bytes], body: bytes = BODY) -> tuple[int, dict, dict]:
    """POST /v1/chat/completions with these exact header lines; (status, headers, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [
            b"POST /v1/chat/completions HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Content-Type: application/json",
            b"Connection: close",
            b"Content-Length: %d" % len(body),
            *headers,
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        raw = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    head_bytes, _, payload = rest.partition(b"\r\n\r\n")
    got: dict[str, str] = {}
    for line in head_bytes.split(b"\r\n"):
        name, _, value = line.partition(b":")
        got[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return int(status_line.split()[1]), got, json.loads(payload) if payload else {}


def assert_error(body: dict, code: str) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code, body


def bearer(secret: str) -> bytes:
    return b"Authorization: Bearer " + secret.encode()


@pytest.mark.parametrize(
    "value", [b"Bearer \xff", b"Bearer sk-\xc3\xa9t\xc3\xa9", b"Bearer sk-\xe2\x82\xac"]
)
async def test_an_undecodable_or_non_ascii_key_is_401(one_node, no_tracebacks, value):
    c, _ = one_node
    status, _, body = await post_raw(c.nodes[0].port, [b"Authorization: " + value])
    assert status == 401, body
    assert_error(body, "invalid_api_key")


@pytest.mark.parametrize(
    "value",
    [b"r\xc3\xa9q-1", b"\xe2\x82\xac-\xe6\x97\xa5", b"\xff\xfe"],
    ids=["latin", "cjk", "bad"],
)
async def test_a_non_ascii_request_id_is_replaced(one_node, no_tracebacks, value):
    c, secret = one_node
    status, headers, body = await post_raw(
        c.nodes[0].port, [bearer(secret), b"x-request-id: " + value]
    )
    assert status == 200, body
    rid = headers["x-request-id"]
    assert rid.isascii() and len(rid) == 32 and rid != value.decode("latin-1")
    assert c.backends[0].stats.requests >= 1


@pytest.mark.parametrize("value", [b"\xe2\x82\xac\xe6\x97\xa5", b"\xff"], ids=["utf8", "bad"])
async def test_a_non_ascii_accept_encoding_is_400(one_node, no_tracebacks, value):
    c, secret = one_node
    served = c.backends[0].stats.requests
    status, _, body = await post_raw(
        c.nodes[0].port, [bearer(secret), b"Accept-Encoding: " + value]
    )
    assert status == 400, body
    assert_error(body, "invalid_header_value")
    assert "Accept-Encoding" in body["error"]["message"]
    assert c.backends[0].stats.requests == served, "the request must not reach a backend"
    # The node is unharmed.
    status, _, body = await post_raw(c.nodes[0].port, [bearer(secret)])
    assert status == 200, body


@pytest.mark.parametrize("value", [b"\xe2\x82\xac\xe6\x97\xa5", b"\xff"], ids=["utf8", "bad"])
async def test_a_non_ascii_session_id_is_only_a_routing_hint(one_node, no_tracebacks, value):
    """x-session-id steers placement within a backend set and goes nowhere else: its bytes
    are hashed as received (see test_members' unit test for the hash itself)."""
    c, secret = one_node
    status, _, body = await post_raw(c.nodes[0].port, [bearer(secret), b"x-session-id: " + value])
    assert status == 200, body
