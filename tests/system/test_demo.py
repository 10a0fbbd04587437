"""`demo` and `bench`: the whole local fleet as users run it, and the load generator against an
in-process cluster."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from affinity_node.sim.bench_cli import add_bench_parser, read_keys, workload_from_args
from affinity_node.sim.demo import add_demo_parser, cache_blocks_for
from affinity_node.sim.haproxy import find_haproxy, haproxy_config, haproxy_status
from affinity_node.sim.workload import WorkloadConfig, estimate_working_set_blocks
from tests.support.cluster import MODEL, cluster
from tests.support.tools import missing

DEMO_TIMEOUT_S = 150.0


def _require_haproxy() -> str:
    binary = find_haproxy()  # PATH, or where the demo looks for it
    if binary is None:
        missing("haproxy", "apt-get install haproxy")
    return binary


def _kill_group(proc: subprocess.Popen[bytes] | asyncio.subprocess.Process) -> None:
    """Last resort when a test fails: the demo and everything it started."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


# -- pieces ----------------------------------------------------------------------------------


def test_generated_haproxy_config_is_valid(tmp_path):
    binary = _require_haproxy()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(18080, 18081, [18090, 18091, 18092]))
    done = subprocess.run(
        [binary, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = cfg.read_text()
    for line in (
        "balance leastconn",
        "option httpchk GET /readyz",
        "timeout server 600s",
        "option http-no-delay",
    ):
        assert line in text


def test_haproxy_status_reads_the_stats_csv():
    csv = (
        "# pxname,svname,qcur,status\n"
        "api,FRONTEND,,OPEN\n"
        "nodes,node-0,0,UP\n"
        "nodes,node-1,0,UP 1/2\n"
        "nodes,node-2,0,DOWN\n"
        "nodes,BACKEND,0,UP\n"
    )
    assert haproxy_status(csv) == {"node-0": "UP", "node-1": "UP 1/2", "node-2": "DOWN"}
    assert haproxy_status("<html>not csv</html>") == {}


def test_caches_are_sized_like_a_fleet():
    cfg = WorkloadConfig(
        base_urls=("http://x",),
        api_keys=("k",),
        tenants=40,
        conversations_per_tenant=2,
        max_turns=16,
        rate=50.0,
        duration_s=18.0,
    )
    blocks = estimate_working_set_blocks(cfg, expected_requests=900)
    per_backend = cache_blocks_for(cfg, 4, 900)
    assert per_backend < blocks / 2  # no backend holds every tenant's prefixes ...
    assert 4 * per_backend >= blocks  # ... all of them together do


def test_parsers_register_their_commands():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(sub)
    add_bench_parser(sub)
    demo = parser.parse_args(["demo", "--duration", "5", "--json", "--no-haproxy"])
    assert demo.duration == 5 and demo.json and demo.no_haproxy and demo.backends == 4
    assert asyncio.iscoroutinefunction(demo.func)
    bench = parser.parse_args(
        ["bench", "--url", "http://lb:8080", "--api-key", "sk-1", "--no-stream"]
    )
    assert bench.stream is False and bench.url == ["http://lb:8080"]
    assert asyncio.iscoroutinefunction(bench.func)


# -- bench against an in-process cluster -----------------------------------------------------


def _bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


async def test_bench_reports_a_cluster(dsn, tmp_path, capsys):
    async with cluster(dsn, nodes=2, backends=3) as c:
        secrets = [await c.new_key(f"tenant-{i}") for i in range(6)]
        keys_file = tmp_path / "keys.txt"
        keys_file.write_text("\n".join(secrets) + "\n")
        report_path = tmp_path / "report.json"
        argv = [
            "--url",
            c.nodes[0].url,
            "--url",
            c.nodes[1].url,
            "--api-keys-file",
            str(keys_file),
            "--rate",
            "40",
            "--duration",
            "2",
            "--model",
            MODEL,
            "--json",
            str(report_path),
        ]
        for i, b in enumerate(c.backends):
            argv += ["--backend-metrics", f"b{i}={b.url}"]
        for n in c.nodes:
            argv += ["--node-metrics", n.url]
        args = _bench_args(argv)
        assert await args.func(args) == 0

        out, err = capsys.readouterr()
        for secret in secrets:
            assert secret not in out and secret not in err
        assert "prefix-cache hit rate" in out and "x-affinity: hit" in out
        doc = json.loads(report_path.read_text())
        run = doc["runs"][0]
        assert doc["ok"] is True and run["errors"] == 0
        n = run["requests"]
        assert n >= 40
        assert set(run["requests_per_backend"]) <= {"b0", "b1", "b2"}
        assert sum(run["requests_per_backend"].values()) == n
        headers = run["affinity_headers"]
        assert headers.get("hit", 0) + headers.get("miss", 0) == n
        assert headers.get("miss", 0) <= 6 * 2  # at most one miss per (key, node)
        nodes = run["node_metrics"]
        assert nodes["hits"] + sum(nodes["misses"].values()) == n
        assert nodes["misses"]["created"] == 6  # one binding per key, whichever node missed
        # Six tenants, each pinned: every backend answer after the first per tenant reuses
        # the long system prompt and the history.
        assert run["prefix_cache"]["source"] == "backend metrics"
        assert run["prefix_cache"]["hit_rate"] > 0.6
        assert run["ttft_s"]["p50"] is not None

        # One key for everything: said out loud, and affinity sees one tenant.
        args = _bench_args(
            [
                "--url",
                c.nodes[0].url,
                "--api-key",
                secrets[0],
                "--concurrency",
                "2",
                "--duration",
                "1",
                "--max-requests",
                "10",
                "--model",
                MODEL,
                "--json",
                "-",
            ]
        )
        assert await args.func(args) == 0
        out, err = capsys.readouterr()
        assert "one API key for all 32 tenants" in err
        assert secrets[0] not in out + err
        run = json.loads(out)["runs"][0]
        assert run["requests"] == 10
        assert run["affinity_headers"] == {"hit": 10} or run["affinity_headers"].get("miss") == 1
        assert run["prefix_cache"]["source"] == "usage.cached_tokens"

        # The skew workload's shape: Zipf tenants, a warm-up, queues sampled on the backends.
        argv = [
            "--url",
            c.nodes[0].url,
            "--api-keys-file",
            str(keys_file),
            "--zipf",
            "2",
            "--warmup",
            "0.5",
            "--duration",
            "1.5",
            "--rate",
            "30",
            "--conversation-key",
            "x-session-id",
            "--model",
            MODEL,
            "--json",
            "-",
        ]
        for i, b in enumerate(c.backends):
            argv += ["--backend-metrics", f"b{i}={b.url}"]
        args = _bench_args(argv)
        assert await args.func(args) == 0
        out, err = capsys.readouterr()
        run = json.loads(out)["runs"][0]
        assert run["warmup_requests"] > 0 and run["errors"] == 0
        assert run["busiest_tenants"][0]["tenant"] == 0
        assert set(run["max_waiting_per_backend"]) == {"b0", "b1", "b2"}
        assert run["ttft_s"]["p90"] is not None
        assert "largest queue b0/b1/b2" in err and "(Zipf 2)" in err


def test_bench_load_shapes_and_keys(monkeypatch):
    monkeypatch.delenv("AFFINITY_API_KEY", raising=False)
    # deploy/docker-compose.yml's flags: Poisson at 20/s, at most 16 in flight.
    args = _bench_args(
        [
            "--url",
            "http://lb",
            "--api-key",
            "sk-1",
            "--keys",
            "20",
            "--rate",
            "20",
            "--duration",
            "60",
            "--concurrency",
            "16",
        ]
    )
    cfg = workload_from_args(args, read_keys(args))
    assert (cfg.rate, cfg.concurrency, cfg.max_inflight, cfg.tenants) == (20.0, None, 16, 20)
    args = _bench_args(["--url", "http://lb", "--concurrency", "4"])
    monkeypatch.setenv("AFFINITY_API_KEY", "sk-a, sk-b")
    keys = read_keys(args)
    assert keys == ["sk-a", "sk-b"]
    cfg = workload_from_args(args, keys)
    assert (cfg.rate, cfg.concurrency, cfg.tenants) == (None, 4, 2)
    cfg = workload_from_args(_bench_args(["--url", "http://lb"]), keys)
    assert (cfg.rate, cfg.concurrency) == (20.0, None)
    assert (cfg.zipf_exponent, cfg.warmup_s, cfg.conversation_key) == (None, 0.0, "none")
    args = _bench_args(
        ["--url", "http://lb", "--zipf", "1.5", "--warmup", "5", "--conversation-key",
         "prompt_cache_key", "--conversations", "16"]
    )  # fmt: skip
    cfg = workload_from_args(args, keys)
    assert (cfg.zipf_exponent, cfg.warmup_s, cfg.conversation_key) == (1.5, 5.0, "prompt_cache_key")
    assert sum(cfg.conversation_counts()) == 2 * 16


async def test_bench_refuses_bad_input(capsys, monkeypatch):
    monkeypatch.delenv("AFFINITY_API_KEY", raising=False)
    args = _bench_args(["--url", "http://127.0.0.1:9"])
    assert await args.func(args) == 2
    assert "no API key" in capsys.readouterr().err
    args = _bench_args(
        ["--url", "http://127.0.0.1:9", "--api-key", "sk-x", "--node-metrics", "ftp://nope"]
    )
    assert await args.func(args) == 2


# -- the demo as users run it ----------------------------------------------------------------


def _run_demo(argv: list[str]) -> tuple[dict[str, Any], str]:
    """The demo as a user runs it (with --json): its report and its stderr; exit 0 asserted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "affinity_node.sim.demo", *argv, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"demo did not finish in {DEMO_TIMEOUT_S}s:\n{err.decode()[-3000:]}")
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    stderr = err.decode()
    assert proc.returncode == 0, stderr[-3000:]
    doc: dict[str, Any] = json.loads(out)
    return doc, stderr


def test_demo_end_to_end():
    """Three runs on a real fleet (processes, Postgres, HAProxy when present)."""
    doc, stderr = _run_demo(["--duration", "10"])
    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == ["affinity off", "node-local affinity", "shared affinity"]
    assert doc["ok"] is True and all(r["errors"] == 0 for r in runs.values())
    rate = {name: r["prefix_cache"]["hit_rate"] for name, r in runs.items()}
    assert rate["shared affinity"] > rate["node-local affinity"] > rate["affinity off"], rate
    assert runs["affinity off"]["affinity_headers"] == {"bypass": runs["affinity off"]["requests"]}
    shared = runs["shared affinity"]
    assert shared["node_metrics"]["misses"]["created"] <= 40
    assert shared["busiest_over_mean"] < 2.0
    assert "shared affinity" in stderr and "prefix-cache hit rate" in stderr  # the table
    # the per-tenant section, from the nodes' usage ledger
    ledger = {name: r["ledger_tenants"] for name, r in runs.items()}
    assert all(len(t) == 5 and all(x["hit_rate"] is not None for x in t) for t in ledger.values())
    spread = {name: sum(x["backends"] for x in t) for name, t in ledger.items()}
    assert spread["shared affinity"] < spread["affinity off"], spread
    assert "ledger tenant #5" in stderr
    if find_haproxy() is None:
        assert "spreads requests" in stderr


async def test_demo_stops_everything_on_sigterm(dsn):
    """SIGTERM mid-run: exit 143, every child process gone, temp files removed, the demo's
    keys deleted from the database it borrowed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "affinity_node.sim.demo",
        "--duration",
        "30",
        "--dsn",
        dsn,
        "--keys",
        "8",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stderr is not None
        seen: list[str] = []

        async def until_load_runs() -> None:
            while True:
                line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
                if not line:
                    raise AssertionError("demo exited early:\n" + "".join(seen))
                seen.append(line)
                if line.startswith("[1/3 affinity off]:"):  # the first progress line
                    return

        await asyncio.wait_for(until_load_runs(), 60)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "fake-backend" in names and "serve" in names
        configs = [Path(arg) for c in children for arg in c.cmdline() if arg.endswith(".yaml")]
        assert configs
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 8
        finally:
            await conn.close()

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 128 + signal.SIGTERM
        assert time.monotonic() - started < 30
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, alive
        assert not any(p.exists() for p in configs)
        assert not configs[0].parent.exists()
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM api_keys") == 0
        finally:
            await conn.close()
        rest = (await proc.stderr.read()).decode()
        assert "SIGTERM: stopping everything" in rest
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            await proc.wait()


def test_demo_refuses_bad_options():
    done = subprocess.run(
        [sys.executable, "-m", "affinity_node.sim.demo", "--backends", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--backends" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "affinity_node.sim.demo", "--scenario", "scale", "--backends", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--backends >= 2" in done.stderr


def test_scale_demo_end_to_end_with_tiny_sizes():
    """The fleet changes under load with the operator's commands: a backend joins, one drains
    (to zero running requests and no binding), no request fails; the report has each phase."""
    argv = ["--scenario", "scale", "--duration", "12", "--warmup", "1", "--keys", "8"]
    doc, stderr = _run_demo(argv)
    assert doc["scenario"] == "scale" and doc["ok"] is True
    assert [r["name"] for r in doc["runs"]] == ["no scale events", "scale events"]
    facts = doc["scale"]
    assert [c.split()[:3] for c in facts["commands"]] == [
        ["affinity-node", "backends", "add"],
        ["affinity-node", "backends", "drain"],
    ]
    assert 3.0 <= facts["added_at"] < facts["drain_at"] <= 12.0
    assert facts["drained_bindings_left"] == 0
    assert 0 < facts["drained_running_zero_s"] <= facts["drain_deadline_s"]
    steady, events = facts["runs"]
    assert [p["phase"] for p in events["phases"]] == ["configured", "one added", "one drained"]
    for run in (steady, events):
        for phase in run["phases"]:
            assert phase["errors"] == 0 and phase["requests"] > 0
            assert abs(sum(phase["share"].values()) - 1) < 1e-6
    assert all(p["share"]["b3"] == 0 for p in steady["phases"])  # never added there
    assert events["phases"][0]["share"]["b3"] == 0
    assert events["phases"][2]["share"]["b3"] > 0  # the drained backend's pairs moved to it
    assert "drained backend: zero running requests and no binding" in stderr


def test_skew_demo_end_to_end_with_tiny_sizes():
    """The skew scenario's three columns and its new rows, on a short run."""
    argv = ["--scenario", "skew", "--duration", "3", "--warmup", "1", "--keys", "4"]
    doc, stderr = _run_demo(argv)
    assert doc["scenario"] == "skew" and doc["ok"] is True
    assert doc["scenarios"] == ["off", "fanout1", "fanout4"]
    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == ["affinity off", "shared, max_fanout 1", "shared, max_fanout 4"]
    assert doc["workload"]["zipf_exponent"] == 2.0 and doc["workload"]["warmup_s"] == 1.0
    assert doc["backend_model"]["max_running"] == 16
    for run in runs.values():
        assert run["errors"] == 0 and run["requests"] > 0 and run["warmup_requests"] > 0
        ttft = run["ttft_s"]
        assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"]
        assert set(run["max_waiting_per_backend"]) == {"b0", "b1", "b2", "b3"}
        tenants = run["busiest_tenants"]
        assert tenants and tenants[0]["tenant"] == 0  # Zipf: tenant 0 is the busiest
        assert all(1 <= t["fanout"] <= 4 and 0 < t["top_share"] <= 1 for t in tenants)
    assert runs["affinity off"]["affinity_headers"].keys() == {"bypass"}
    one = runs["shared, max_fanout 1"]
    assert one["node_metrics"]["misses"]["created"] <= 4  # one binding per key
    for row in (
        "TTFT p50 / p90 / p99 (ms)",
        "end-to-end p50 / p99 (ms)",
        "largest queue b0/b1/b2/b3",
        "busiest tenant #1: top backend / fan-out",
        "warm-up requests (not counted)",
        "note: Zipf 2 over 4 tenants: t0",
    ):
        assert row in stderr, row


def test_agents_demo_end_to_end_with_tiny_sizes():
    """Responses-API agent sessions: a plain round-robin LB loses chains (404s); through the
    nodes no chain is lost, with or without fan-out, and no request fails (exit 0)."""
    argv = ["--scenario", "agents", "--duration", "5", "--warmup", "1"]
    doc, stderr = _run_demo(argv)
    assert doc["scenario"] == "agents" and doc["ok"] is True
    assert doc["scenarios"] == ["off", "shared", "fanout"]
    runs = {r["name"]: r for r in doc["runs"]}
    assert list(runs) == ["affinity off (plain LB)", "shared affinity", "shared + fan-out"]
    off = runs.pop("affinity off (plain LB)")
    # Round-robin over 4 backends: most follow-ups miss their owner, each a 404 (an error).
    assert off["chain_failures"] > 0 and off["errors"] == off["chain_failures"]
    assert off["node_metrics"] is None and off["affinity_headers"] == {}
    for run in runs.values():
        assert run["chain_failures"] == 0 and run["errors"] == 0 and run["requests"] > 0
        assert run["warmup_requests"] > 0
        assert run["affinity_headers"].keys() == {"hit"}  # bound pairs and owners
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p90"] <= run["ttft_s"]["p99"]
        assert run["prefix_cache"]["hit_rate"] > off["prefix_cache"]["hit_rate"]
    for row in (
        "chain failures (404s)",
        "TTFT p50 / p90 / p99 (ms)",
        "largest queue b0/b1/b2/b3",
        "busiest tenant #1: top backend / fan-out",
        "note: affinity off (plain LB): no node",
    ):
        assert row in stderr, row


def test_db_failover_demo_loses_no_request():
    """The primary crashes and the standby is promoted under traffic: every phase's request
    count is served without an error, and the convergence time is printed."""
    done = subprocess.run(
        [sys.executable, "-m", "affinity_node.sim.demo", "--scenario", "db-failover"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in done.stdout.splitlines()
        if line.split()[:1] in (["before"], ["during"], ["after"])
    }
    assert set(rows) == {"before", "during", "after"}, done.stdout
    assert all(int(r[0]) > 0 and r[1] == "0" for r in rows.values()), done.stdout
    assert "time to converge" in done.stdout
