"""Logs: the request id on every line logged while handling a request; never a secret, never a
key id at INFO and above."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import replace

import aiohttp
import asyncpg
import openai
import pytest

from affinity_node.app import run_node
from affinity_node.observability.logs import (
    REQUEST_ID,
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    configure_logging,
)
from affinity_node.sim.fake_backend import FakeBackendConfig, serve
from affinity_node.store.keys import create_key, revoke_key
from tests.support.cluster import MODEL, node_config

MESSAGES = [{"role": "user", "content": "hello"}]


def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("affinity_node.test", level, __file__, 1, msg, args, None)


def test_filter_adds_the_request_id_of_the_current_context():
    f = RequestContextFilter()
    rec = record("outside")
    assert f.filter(rec) and rec.request_id == "-"  # type: ignore[attr-defined]
    token = REQUEST_ID.set("req-7")
    try:
        rec = record("inside")
        f.filter(rec)
        assert rec.request_id == "req-7"  # type: ignore[attr-defined]
        line = json.loads(JsonFormatter().format(rec))
        assert line["request_id"] == "req-7" and line["msg"] == "inside"
        assert "[req-7]" in TextFormatter().format(record("plain"))
    finally:
        REQUEST_ID.reset(token)
    outside = json.loads(JsonFormatter().format(record("after")))
    assert "request_id" not in outside


def test_filter_masks_anything_shaped_like_an_api_key():
    f = RequestContextFilter()
    rec = record("auth failed for %s (%d)", "sk-AbCdEf0123456789_-xyz", 3)
    f.filter(rec)
    assert rec.getMessage() == "auth failed for sk-*** (3)"
    rec = record("health-check task-abcdefgh fine")  # words ending in "sk-" stay
    f.filter(rec)
    assert rec.getMessage() == "health-check task-abcdefgh fine"
    bad = record("%d", "not a number")  # a broken call site must not raise from the filter
    assert f.filter(bad)


@contextlib.contextmanager
def captured_logs(level: str) -> Iterator[io.StringIO]:
    """configure_logging as `serve` does, into a buffer; pytest's handlers restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    configure_logging(level, json_lines=True, stream=buf)
    try:
        yield buf
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


async def admin_fail(url: str, body: dict[str, object]) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/admin/fail", json=body) as r:
        assert r.status == 200


async def test_no_secret_or_key_id_in_logs_and_request_ids_on_request_lines(dsn):
    with captured_logs("INFO") as buf:
        async with AsyncExitStack() as stack:
            fakes = []
            for i in range(3):
                fake = await serve(FakeBackendConfig(backend_id=f"b{i}", models=[MODEL]))
                stack.push_async_callback(fake.close)
                fakes.append(fake)
            cfg = node_config(dsn, fakes, "node-log")
            # Health checks once at start only: an ejection below is then the request's doing,
            # logged while handling it (the lines this test wants to see the request id on).
            cfg = replace(cfg, health=replace(cfg.health, interval_seconds=3600))
            node = await stack.enter_async_context(run_node(cfg))

            conn = await asyncpg.connect(dsn)
            try:
                good, good_secret = await create_key(conn, "good")
                revoked, revoked_secret = await create_key(conn, "revoked")
                await revoke_key(conn, revoked.id)
            finally:
                await conn.close()

            def client(secret: str) -> openai.AsyncOpenAI:
                c = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key=secret, max_retries=0)
                stack.push_async_callback(c.close)
                return c

            ok = client(good_secret)
            for stream in (False, True, False):
                resp = await ok.chat.completions.create(
                    model=MODEL, messages=MESSAGES, stream=stream
                )
                if stream:
                    async for _ in resp:  # type: ignore[union-attr]
                        pass
            forged = "sk-" + "Q" * 43
            for secret in (forged, revoked_secret, good_secret[:-2] + "zz"):
                with pytest.raises(openai.AuthenticationError):
                    await client(secret).chat.completions.create(model=MODEL, messages=MESSAGES)
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"{node.url}/v1/chat/completions",
                    headers={"Authorization": f"Basic {good_secret}"},
                    json={"model": MODEL},
                ) as r,
            ):
                assert r.status == 401

            # Every backend fails: the first request fails on two backends (502), the second
            # fails its bound backend again, which ejects it while handling that request.
            for fake in fakes:
                await admin_fail(fake.url, {"status": 503})
            for rid in ("log-req-1", "log-req-2"):
                with pytest.raises(openai.APIStatusError) as err:
                    await ok.chat.completions.create(
                        model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": rid}
                    )
                assert err.value.status_code in (502, 503)
            for fake in fakes:
                await admin_fail(fake.url, {})
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines, "nothing was logged"
    text = buf.getvalue()
    for secret in (good_secret, revoked_secret, forged):
        assert secret not in text and secret.removeprefix("sk-") not in text
    for key_id in (good.id, revoked.id):
        assert str(key_id) not in text and key_id.hex not in text
    assert all(line["level"] != "debug" for line in lines)
    ejected = [line for line in lines if "ejected" in line["msg"]]
    assert ejected, lines
    assert all(line.get("request_id", "").startswith("log-req-") for line in ejected), ejected
    # Lines logged outside a request carry no request id.
    assert any("request_id" not in line for line in lines)
