"""Bad input: the right status, an OpenAI error body, the matching SDK exception, no harm done."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cluster import MODEL, Cluster, cluster

ALLOWED = {200, 400, 401, 404, 405, 413, 422, 431}


@pytest.fixture
async def one_node(dsn) -> AsyncIterator[tuple[Cluster, str]]:
    async with cluster(dsn, nodes=1, backends=2) as c:
        yield c, await c.new_key("alice")


def assert_error_body(body: dict, status: int) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]


async def raw(
    c: Cluster,
    method: str,
    path: str,
    secret: str | None,
    data: bytes | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if secret:
        hdrs["Authorization"] = f"Bearer {secret}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, c.nodes[0].url + path, data=data, headers=hdrs) as r,
    ):
        text = await r.text()
        return r.status, json.loads(text) if text.startswith("{") else {"raw": text}


CASES = [
    ("invalid json", b"{nope", 400, "invalid_json"),
    ("array body", b"[1, 2]", 400, None),
    ("string body", b'"hi"', 400, None),
    ("missing model", b'{"messages": []}', 400, "missing_required_parameter"),
    ("model not a string", b'{"model": 7, "messages": []}', 400, "invalid_type"),
    ("model empty", b'{"model": "", "messages": []}', 400, "invalid_type"),
    (
        "stream not bool",
        json.dumps({"model": MODEL, "stream": "yes"}).encode(),
        400,
        "invalid_type",
    ),
    ("unknown model", b'{"model": "gpt-nope", "messages": []}', 404, "model_not_found"),
    (
        "odd characters",
        json.dumps({"model": "../\u0000\u202e;DROP TABLE"}).encode(),
        404,
        "model_not_found",
    ),
    ("10 KB model", json.dumps({"model": "m" * 10_000}).encode(), 400, "invalid_value"),
    ("100,000 nested arrays", b'{"model": "x", "a": ' + b"[" * 100_000, 400, "invalid_json"),
    ("100,000 nested closed", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "x": "' + b"\xff\xfe" + b'"}', 400, None),
    ("raw invalid UTF-8", b'{"model": "' + bytes([0xFF, 0xFE, 0xC3]) + b'"}', 400, "invalid_json"),
    (
        "duplicate keys",
        b'{"model": "' + MODEL.encode() + b'", "model": "other", "messages": []}',
        400,
        "invalid_json",
    ),
    (
        "escaped duplicate key",
        b'{"model": "' + MODEL.encode() + b'", "mod\\u0065l": "other", "messages": []}',
        400,
        "invalid_json",
    ),
]


@pytest.mark.parametrize(("name", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_bodies(one_node, name, body, status, code):
    c, secret = one_node
    got, payload = await raw(c, "POST", "/v1/chat/completions", secret, body)
    assert got == status, (name, payload)
    assert_error_body(payload, status)
    if code:
        assert payload["error"]["code"] == code
    # The node is unharmed: a good request right after succeeds.
    ok, _ = await raw(
        c,
        "POST",
        "/v1/chat/completions",
        secret,
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
    )
    assert ok == 200


@pytest.mark.parametrize(
    "inside",
    [
        b'"messages": [{"role": "user", "role": "x", "content": "hi"}]',  # nested duplicate
        b'"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000,
    ],
    ids=["nested duplicate keys", "a 5,000-digit number"],
)
async def test_what_the_proxy_does_not_read_reaches_the_backend_as_sent(one_node, inside):
    """Inside values the backend judges: the node forwards the body byte for byte and the
    client gets the backend's own answer."""
    c, secret = one_node
    body = b'{"model": "' + MODEL.encode() + b'", ' + inside + b"}"
    status, payload = await raw(c, "POST", "/v1/chat/completions", secret, body)
    received = [b.stats.last_body for b in c.backends]
    assert body in received, (status, payload)
    if status != 200:
        assert_error_body(payload, status)


async def test_auth_errors_and_methods(one_node):
    c, secret = one_node
    body = json.dumps({"model": MODEL, "messages": []}).encode()
    for hdr_secret, extra in (
        (None, {}),
        ("sk-unknown", {}),
        (None, {"Authorization": "Basic x"}),
        (None, {"Authorization": "Bearer "}),
    ):
        status, payload = await raw(c, "POST", "/v1/chat/completions", hdr_secret, body, extra)
        assert status == 401
        assert payload["error"]["code"] == "invalid_api_key"
    status, payload = await raw(c, "GET", "/v1/chat/completions", secret, None)
    assert status == 405
    assert_error_body(payload, 405)
    status, payload = await raw(c, "POST", "/v1/nowhere", secret, b"{}")
    assert status == 404
    assert_error_body(payload, 404)


async def test_body_over_the_limit_is_413(one_node):
    c, secret = one_node
    big = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    )
    status, payload = await raw(c, "POST", "/v1/chat/completions", secret, big.encode())
    assert status == 413
    assert payload["error"]["code"] == "request_too_large"


async def test_a_chunked_body_over_the_limit_is_413_and_one_within_it_is_served(one_node):
    """No Content-Length to refuse up front: the limit is counted as the chunks arrive."""
    c, secret = one_node
    start = b'{"model": "%s", "messages": [{"role": "user", "content": "' % MODEL.encode()

    async def chunked(quarters: int) -> AsyncIterator[bytes]:
        yield start
        for _ in range(quarters):
            yield b"x" * (256 * 1024)
        yield b'"}]}'

    async with aiohttp.ClientSession() as s:
        # 9 MB (the node's limit is 8), then 512 KB (the fake backend's own limit is 1 MB)
        for quarters, want in ((36, 413), (2, 200)):
            async with s.post(
                c.nodes[0].url + "/v1/chat/completions",
                data=chunked(quarters),
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            ) as r:
                assert r.status == want, await r.text()
                if want == 413:
                    assert (await r.json())["error"]["code"] == "request_too_large"


async def test_header_flood_is_refused_without_500(one_node):
    c, secret = one_node
    flood = {f"x-junk-{i}": "v" * 100 for i in range(200)}
    status, _ = await raw(c, "POST", "/v1/chat/completions", secret, b"{}", flood)
    assert status in (400, 431)
    huge = {"x-huge": "v" * 100_000}
    status, _ = await raw(c, "POST", "/v1/chat/completions", secret, b"{}", huge)
    assert status in (400, 431)


async def test_sdk_raises_the_matching_exceptions(one_node):
    c, secret = one_node
    client = c.client(0, secret)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=msgs)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL, messages=msgs, extra_body={"stream": "sometimes"}
        )
    assert err.value.param == "stream"
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="m" * 10_000, prompt="hi")
    with pytest.raises(openai.AuthenticationError):
        await c.client(0, "sk-wrong").chat.completions.create(model=MODEL, messages=msgs)
    with pytest.raises(openai.APIStatusError) as too_big:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}]
        )
    assert too_big.value.status_code == 413


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.one_of(st.just(MODEL), st.text(max_size=30), json_values)},
        optional={"stream": json_values, "messages": json_values, "prompt": json_values},
    ).map(lambda v: json.dumps(v).encode()),
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    headers=st.dictionaries(
        st.sampled_from(["x-request-id", "authorization", "content-type", "accept", "x-custom"]),
        header_values,
        max_size=3,
    ),
    use_key=st.booleans(),
)
async def test_fuzz_never_500(one_node, body, path, headers, use_key):
    c, secret = one_node
    status, payload = await raw(c, "POST", path, secret if use_key else None, body, headers)
    assert status in ALLOWED, (status, payload, body)
    if status != 200:
        assert "error" in payload or "raw" in payload
        if "error" in payload:
            assert_error_body(payload, status)
