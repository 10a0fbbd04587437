"""Two proxies on one core: the node against the bare forwarder, or against the node at
another git revision.

    python -m affinity_node.devtools.bench_versus [--against forwarder|forwarder-http1|REV]
        [--rounds 3] [--method auto|interleaved|side-by-side]
        [--duration 8] [--sizes tiny,8k,200k,1m]

Each round measures, per case, the direct rate (wrk straight at nginx) and then the two
proxies pinned to the proxy core, each at full load from wrk on the other core (with nginx):
- interleaved (the reference; the default from 200 KB on): one proxy at a time, each with the
  whole load core, the order swapped every round (A,B, B,A, ...), medians over rounds;
- side by side (the default below 200 KB): both at the same moments, each from its own wrk,
  so whatever else runs on the machine hits both alike and the ratio of their throughputs is
  the inverse ratio of their CPU cost per request, but only while the load core keeps up: two
  wrk processes pushing 200 KB bodies may saturate it, and then both proxies are capped at the
  same rate and the ratio reads ~1 whatever they cost.
Every run reports the CPU of wrk, nginx and the proxy, the proxy's CPU per request and per KB
of body, and is marked SATURATED when wrk or nginx is above 85% of a core or the proxies' rate
above 0.85 of the direct rate: such a ratio measures the load side, not the proxies.
Fresh processes every round.

A revision runs from a git worktree of this repository, on its own database migrated by its
own code, with a config that sets no key it may not know. Needs nginx, wrk and taskset.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from affinity_node.argtypes import positive_float, positive_int
from affinity_node.devtools import bench_overhead as bench
from affinity_node.sim.support import free_port, postgres

REPO = Path(__file__).resolve().parents[2]
FORWARDERS = ("forwarder", "forwarder-http1")


def _worktree(rev: str, under: Path) -> Path:
    path = under / f"rev-{rev}"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def _remove_worktree(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True
    )


async def _create_database(admin_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return urlunsplit(urlsplit(admin_dsn)._replace(path="/" + name))


def _prepare_with(tree: Path, dsn: str) -> str:
    """Migrates `dsn` and creates a key with the code in `tree`; returns the key's secret."""
    code = (
        "import asyncio, sys\n"
        "from affinity_node.devtools.bench_overhead import _prepare_db\n"
        "print(asyncio.run(_prepare_db(sys.argv[1]))[1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, dsn],
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _start_node(
    procs: bench.Procs, tmp: Path, tree: Path, dsn: str, secret: str, backend: str, cpu: int
) -> bench.Target:
    port = free_port()
    config = tmp / f"node-{port}.yaml"
    config.write_text(bench.node_yaml(dsn, port, backend, ledger=None))  # each its default
    # In the tree: `-m` puts the working directory first on sys.path, before PYTHONPATH.
    argv = ["env", "-C", str(tree), f"PYTHONPATH={tree}", sys.executable, "-m", "affinity_node"]
    argv.append("serve")
    proc = procs.start(f"node-{port}", [*argv, "--config", str(config)], cpu)
    base = f"http://127.0.0.1:{port}"
    bench.wait_ready(base + "/readyz", proc)
    for path, stream in bench.MODES.values():  # the binding exists: measured requests hit
        status, _headers, body = bench.post(base + path, bench.request_body(stream), secret)
        if status != 200:
            raise bench.BenchError(f"node answered {status}: {body[:300]!r}")
    return bench.Target(f"node {tree.name}", base, proc, secret)


def versus(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per case: the summary of its rounds (bench_overhead.summarise_rounds)."""
    cases = [(s, m) for s in args.sizes for m in bench.MODES]
    rounds: dict[str, list[dict[str, bench.Run]]] = {f"{s} {m}": [] for s, m in cases}
    methods = {f"{s} {m}": bench.method_for(args.method, s) for s, m in cases}
    names = ("", "")
    with tempfile.TemporaryDirectory(prefix="affinity-versus-") as t, postgres(None) as admin:
        tmp = Path(t)
        procs = bench.Procs(tmp)
        trees: list[Path] = []
        try:
            port = free_port()
            (tmp / "nginx.conf").write_text(bench.nginx_conf(tmp, port))
            nginx = procs.start(
                "nginx",
                ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "e")],
                args.load_cpu,
            )
            backend = f"http://127.0.0.1:{port}"
            bench.wait_ready(backend + "/health", nginx)
            direct = bench.Target("direct", backend, None, "unused")
            here = REPO
            here_dsn = asyncio.run(_create_database(admin, "versus_here"))
            here_secret = _prepare_with(here, here_dsn)
            other: tuple[Path, str, str] | None = None
            if args.against not in FORWARDERS:
                tree = _worktree(args.against, tmp)
                trees.append(tree)
                dsn = asyncio.run(_create_database(admin, "versus_other"))
                other = (tree, dsn, _prepare_with(tree, dsn))
            for n in range(args.rounds):
                a = _start_node(procs, tmp, here, here_dsn, here_secret, backend, args.proxy_cpu)
                a.name = "this node"
                if other is None:
                    proc, base = bench.start_forwarder(
                        procs, backend, args.proxy_cpu, http1=args.against == "forwarder-http1"
                    )
                    b = bench.Target(args.against, base, proc, "unused")
                else:
                    b = _start_node(procs, tmp, *other, backend, args.proxy_cpu)
                names = (a.name, b.name)
                for size, mode in cases:
                    case = f"{size} {mode}"
                    url_path, stream = bench.MODES[mode]
                    runs = bench.compare_round(
                        methods[case], direct, (a, b), url_path,
                        bench.request_body(stream, size), args.duration, args.load_cpu,
                        nginx.popen.pid, tmp, flip=n % 2 == 1,
                    )  # fmt: skip
                    rounds[case].append(runs)
                    print(f"round {n + 1}" + bench.round_line(case, methods[case], runs, *names))
                    sys.stdout.flush()
                assert a.proc is not None and b.proc is not None
                procs.stop(a.proc)
                procs.stop(b.proc)
        finally:
            procs.close()
            for tree in trees:
                _remove_worktree(tree)
    return {case: bench.summarise_rounds(methods[case], rs, *names) for case, rs in rounds.items()}


def table(summaries: dict[str, dict[str, Any]], against: str) -> str:
    names = next(iter(summaries.values()))["targets"]
    a, b = (n for n in names if n != "direct")
    lines = [
        f"this checkout's node over {against}, full load, medians over rounds; CPU shares are "
        "of one core (wrk and nginx share the load core):"
    ]
    lines += bench.compare_table(summaries, a, b)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m affinity_node.devtools.bench_versus")
    p.add_argument(
        "--against",
        default="forwarder",
        help="forwarder (aiohttp's client; default), forwarder-http1 (the node's client) or a "
        "git revision",
    )
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--duration", type=positive_float, default=8.0, help="seconds per run")
    p.add_argument("--sizes", default="tiny,200k,1m", help=f"of {','.join(bench.SIZES)}")
    p.add_argument(
        "--method",
        choices=bench.METHODS,
        default="auto",
        help="interleaved (one proxy at a time: the reference), side-by-side (both at once), "
        "auto (default: interleaved from 200k on)",
    )
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    args = p.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or any(s not in bench.SIZES for s in args.sizes):
        p.error(f"--sizes takes {','.join(bench.SIZES)}")
    missing = bench.missing_tools()
    if missing:
        print(f"bench-versus needs {', '.join(missing)}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    try:
        summaries = versus(args)
    except (bench.BenchError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(summaries, args.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
