"""Two proxies side by side on one core: the node against the bare forwarder, or against the
node at another git revision.

    python -m affinity_node.devtools.bench_versus [--against forwarder|forwarder-http1|REV]
        [--rounds 3]
        [--duration 8] [--sizes tiny,8k,200k]

Both proxies run pinned to the proxy core at the same moments, each at full load from its own
wrk on the other core (with nginx), so whatever else runs on the machine hits both alike: the
ratio of their throughputs is the inverse ratio of their CPU cost per request. Runs one after
the other (bench-overhead) drifted by 15-40% on a shared VM; side by side, rounds agree within
a few percent. Fresh processes every round; prints each round and the median ratio per case.

A revision runs from a git worktree of this repository, on its own database migrated by its
own code, with a config that sets no key it may not know. Needs nginx, wrk and taskset.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from affinity_node.argtypes import positive_float, positive_int
from affinity_node.devtools import bench_overhead as bench
from affinity_node.sim.support import free_port, postgres

REPO = Path(__file__).resolve().parents[2]
FORWARDERS = ("forwarder", "forwarder-http1")


@dataclass
class Side:
    name: str
    proc: bench.Proc
    base: str
    secret: str


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
) -> Side:
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
    return Side(f"node {tree.name}", proc, base, secret)


def _run(side: Side, url_path: str, body: str, seconds: float, cpu: int, tmp: Path) -> bench.Run:
    own = tmp / f"wrk-{side.proc.popen.pid}"
    own.mkdir(exist_ok=True)
    cpu0 = bench.cpu_seconds(side.proc.popen.pid)
    run = bench.wrk(side.base + url_path, body, side.secret, seconds, cpu, own)
    if run.requests:
        used = bench.cpu_seconds(side.proc.popen.pid) - cpu0
        run.cpu_us_per_req = used / run.requests * 1e6
    return run


def versus(args: argparse.Namespace) -> dict[str, list[float]]:
    cases = [(s, m) for s in args.sizes for m in bench.MODES]
    ratios: dict[str, list[float]] = {f"{s} {m}": [] for s, m in cases}
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
                if other is None:
                    proc, base = bench.start_forwarder(
                        procs, backend, args.proxy_cpu, http1=args.against == "forwarder-http1"
                    )
                    b = Side(args.against, proc, base, "unused")
                else:
                    b = _start_node(procs, tmp, *other, backend, args.proxy_cpu)
                for size, mode in cases:
                    url_path, stream = bench.MODES[mode]
                    body = bench.request_body(stream, size)
                    runs: list[bench.Run] = []
                    for seconds in (max(1.0, args.duration / 4), args.duration):  # warm, then
                        with ThreadPoolExecutor(2) as pool:
                            futures = [
                                pool.submit(_run, s, url_path, body, seconds, args.load_cpu, tmp)
                                for s in (a, b)
                            ]
                            runs = [f.result() for f in futures]
                    ra, rb = runs
                    ratio = ra.rps / rb.rps if rb.rps else float("nan")
                    ratios[f"{size} {mode}"].append(ratio)
                    print(
                        f"round {n + 1}  {size:>4} {mode:<14} this node {ra.rps:6.0f} req/s "
                        f"{ra.cpu_us_per_req or 0:5.0f} us/req;  {b.name} {rb.rps:6.0f} req/s "
                        f"{rb.cpu_us_per_req or 0:5.0f} us/req;  ratio {ratio:.3f}",
                        flush=True,
                    )
                procs.stop(a.proc)
                procs.stop(b.proc)
        finally:
            procs.close()
            for tree in trees:
                _remove_worktree(tree)
    return ratios


def table(ratios: dict[str, list[float]], against: str) -> str:
    lines = [f"this checkout's node over {against}, throughput side by side (median, range):"]
    for case, values in ratios.items():
        lines.append(
            f"  {case:<22} x{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"
        )
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
    p.add_argument("--sizes", default="tiny,200k", help=f"of {','.join(bench.SIZES)}")
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
        ratios = versus(args)
    except (bench.BenchError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(ratios, args.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
