"""The benchmark commands still run (small sizes; their figures are not checked here)."""

from __future__ import annotations

import asyncio
import sys

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


@pytest.mark.parametrize("against", ["forwarder", "forwarder-http1"])
async def test_versus_runs_when_its_tools_are_installed(against):
    import shutil

    if not all(shutil.which(t) for t in ("nginx", "wrk", "taskset", "env")):
        missing("one of nginx, wrk and taskset")
    code, out = await run(
        "affinity_node.devtools.bench_versus",
        *("--rounds", "1", "--duration", "1", "--sizes", "tiny", "--against", against),
    )
    assert code == 0, out
    assert f"over {against}" in out and "tiny non-streaming" in out and "ratio" in out
