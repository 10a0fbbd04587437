"""The benchmark commands still run (small sizes; their figures are not checked here)."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any

import pytest

from tests.support.tools import missing


async def run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_engine_benchmark_runs_end_to_end(pg_admin_dsn):
    code, out = await run(
        "affinity_node.devtools.bench_engine",
        "--dsn",
        pg_admin_dsn,
        "--pairs",
        "40",
        "--calls",
        "4000",
        "--rounds",
        "3",
        "--duration",
        "2",
        "--rate",
        "500",
    )
    assert code == 0, out
    for section in (
        "1. hit latency",
        "2. cold-miss latency",
        "3. rebind on node A",
        "4. statements per 1000 resolves",
        "5. per-key limits",
    ):
        assert section in out
    assert "chooser ran once each" in out
    assert "deadlock" not in out.lower()


async def test_scale_benchmark_runs_end_to_end_at_a_small_size(pg_admin_dsn):
    code, out = await run(
        "affinity_node.devtools.bench_scale",
        "--dsn",
        pg_admin_dsn,
        "--bindings",
        "2000",
        "--keys",
        "2000",
        "--no-key-resync",
        "--changes",
        "30",
        "--outage",
        "0.5",
        "--rate",
        "100",
        "--duration",
        "1",
    )
    assert code == 0, out
    for row in (
        "node start -> holds every binding (s)",
        "RSS per binding (bytes)",
        "resync: rows read / time (ms)",
        "notify lag trigger->cache p50 / p99 (ms)",
        "cleanup batch p50 / max (ms), total (s)",
    ):
        assert row in out, out
    assert "30 -> incremental" in out  # the outage's changes, caught up
    assert "holds 2,000 within 10 s of starting: yes" in out
    for row in ("keys held (its /readyz)", "RSS per key: loaded / after a periodic resync"):
        assert row in out, out
    assert "200 / 401" in out  # the last key read is held, an unknown one refused
    assert "holds 2,000 keys, under 100 bytes of RSS each:" in out


async def test_overhead_benchmark_explains_itself():
    code, out = await run("affinity_node.devtools.bench_overhead", "--help")
    assert code == 0 and "--duration" in out


def test_profile_summary_splits_samples_by_package():
    from affinity_node.devtools.profile_overhead import summarise

    raw = [
        "run (aiohttp/web.py:1);handle (affinity_node/http/completions.py:40) 6",
        "run (aiohttp/web.py:1);_writelines (/x/site-packages/aiohttp/http_writer.py:116) 3",
        "run (uvloop/__init__.py:1) 1",
        "garbage",
    ]
    out = summarise(raw)
    assert "10 samples" in out
    assert "60.0%  affinity_node" in out and "30.0%  aiohttp" in out
    assert "10.0%  event loop" in out
    assert "handle (affinity_node/http/completions.py)" in out


async def test_profile_runs_when_its_tools_are_installed():
    import shutil

    from affinity_node.devtools.profile_overhead import py_spy

    if py_spy() is None or not all(shutil.which(t) for t in ("nginx", "wrk", "taskset")):
        missing("one of py-spy, nginx, wrk and taskset")
    code, out = await run("affinity_node.devtools.profile_overhead", "--duration", "2")
    assert code == 0, out
    assert "affinity_node" in out and "aiohttp" in out and "req/s" in out


@pytest.mark.parametrize(
    ("against", "size", "method"),
    [("forwarder", "1m", "interleaved"), ("forwarder-http1", "tiny", "side-by-side")],
)
async def test_versus_runs_when_its_tools_are_installed(against, size, method):
    """Each round shows the direct rate and wrk's and nginx's CPU beside the proxies'; the
    1 MB body goes through both proxies without a failed request."""
    import shutil

    if not all(shutil.which(t) for t in ("nginx", "wrk", "taskset", "env")):
        missing("one of nginx, wrk and taskset")
    code, out = await run(
        "affinity_node.devtools.bench_versus",
        *("--rounds", "1", "--duration", "1", "--sizes", size, "--against", against),
    )
    assert code == 0, out
    assert f"over {against}" in out, out
    assert re.search(rf"^{size} non-streaming +{method} +direct", out, re.M), out
    assert "ratio" in out and "direct" in out and "wrk" in out and "nginx" in out
    assert "ERRORS" not in out, out


def run_of(rps: float, loadgen: float, backend: float = 0.1, us: float = 100.0) -> Any:
    from affinity_node.devtools.bench_overhead import Run

    return Run(
        rps, 1.0, 2.0, requests=int(rps), cpu_us_per_req=us, cpu_share=1.0,
        loadgen_cpu=loadgen, backend_cpu=backend, load_core_busy=loadgen + backend,
        body_kb=200.0,
    )  # fmt: skip


def test_saturation_adds_up_the_load_generators_that_ran_together():
    """Side by side, two wrk processes at 45% each saturate the load core between them: the
    pair is flagged though neither run alone would be."""
    from affinity_node.devtools.bench_overhead import saturation

    a, b = run_of(1000, 0.45), run_of(1000, 0.45)
    assert saturation([a], 10_000) == []
    assert saturation([a, b], 10_000) == ["loadgen"]
    assert saturation([run_of(1000, 0.2, backend=0.9)], 10_000) == ["backend"]
    assert saturation([run_of(900, 0.2)], 1000) == ["near the direct rate"]


def test_rounds_summary_flags_side_by_side_pairs_and_gives_medians():
    from affinity_node.devtools.bench_overhead import compare_table, summarise_rounds

    rounds = [
        {"direct": run_of(10_000, 0.9), "node": run_of(2400, 0.5, us=200), "fwd": run_of(2400, 0.5)}
        for _ in range(3)
    ]
    side = summarise_rounds("side-by-side", rounds, "node", "fwd")
    assert side["ratio"] == 1.0 and side["cpu_ratio"] == 0.5
    assert side["targets"]["node"]["saturated"] == ["loadgen"]
    assert side["targets"]["fwd"]["cpu_us_per_kb"] == 0.5
    text = "\n".join(compare_table({"200k non-streaming": side}, "node", "fwd"))
    assert "SATURATED: loadgen" in text and "cannot tell" in text
    apart = summarise_rounds("interleaved", rounds, "node", "fwd")
    assert apart["targets"]["node"]["saturated"] == []
    text = "\n".join(compare_table({"c": apart}, "node", "fwd"))
    assert "cannot tell" not in text and "noisy" not in text
    for r in rounds:
        r["fwd"].cpu_share = 0.5  # others took half the proxy core
    text = "\n".join(
        compare_table({"c": summarise_rounds("interleaved", rounds, "node", "fwd")}, "node", "fwd")
    )
    assert "req/s noisy: a proxy got 50% of its core" in text


def test_auto_method_interleaves_large_bodies_only():
    from affinity_node.devtools.bench_overhead import method_for

    assert [method_for("auto", s) for s in ("tiny", "8k", "200k", "1m")] == [
        "side-by-side", "side-by-side", "interleaved", "interleaved"
    ]  # fmt: skip
    assert method_for("side-by-side", "1m") == "side-by-side"


def test_request_bodies_reach_their_sizes():
    import json

    from affinity_node.devtools.bench_overhead import SIZES, request_body

    for size, target in SIZES.items():
        body = request_body(True, size)
        assert json.loads(body)["stream"] is True
        assert 0.98 * target <= len(body) <= 1.02 * target or size == "tiny"


@pytest.mark.parametrize("http1", [False, True])
async def test_bare_forwarder_relays_bodies_over_a_mebibyte(http1):
    """aiohttp's default client_max_size (1 MiB) would answer 413 to a body the node takes
    (its limit is 8 MiB): the "1m" body is just under it (1,040,087 bytes), a larger size
    would not be."""
    from aiohttp import ClientSession, web

    from affinity_node.devtools.bare_forwarder import build_app, build_http1_app
    from affinity_node.devtools.bench_overhead import request_body

    seen: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(len(await request.read()))
        return web.json_response({"ok": True})

    upstream = web.Application(client_max_size=64 * 1024 * 1024)
    upstream.router.add_post("/v1/chat/completions", answer)
    runners = []
    try:
        up = web.AppRunner(upstream)
        runners.append(up)
        await up.setup()
        up_site = web.TCPSite(up, "127.0.0.1", 0)
        await up_site.start()
        up_port = up_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        build = build_http1_app if http1 else build_app
        fwd = web.AppRunner(build(f"http://127.0.0.1:{up_port}"))
        runners.append(fwd)
        await fwd.setup()
        fwd_site = web.TCPSite(fwd, "127.0.0.1", 0)
        await fwd_site.start()
        port = fwd_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        body = request_body(False, "1m").encode()
        assert len(body) > 1_000_000
        body = body.replace(b'"max_tokens":64', b'"max_tokens":64,"pad":"' + b"x" * 2**20 + b'"')
        async with (
            ClientSession() as client,
            client.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            assert await resp.json() == {"ok": True}
        assert seen == [len(body)]
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
