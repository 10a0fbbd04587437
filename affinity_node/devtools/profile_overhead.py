"""Where the node's CPU goes under the overhead benchmark's load: a py-spy profile, summarised.

    python -m affinity_node.devtools.profile_overhead [--target node|forwarder] [--size tiny]
        [--mode non-streaming] [--duration 10] [--raw PATH]

Starts nginx and the target as bench_overhead does (target on cpu 0, nginx and wrk on cpu 1),
drives it with wrk at full load, samples it with py-spy, and prints the share of samples by
package (aiohttp, our code, the event loop, ...) and our functions by self time. Needs py-spy
(the dev extra), nginx and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from affinity_node.devtools import bench_overhead as bench
from affinity_node.sim.support import free_port, postgres

_FRAME = re.compile(r"(?P<fn>.*) \((?P<path>.*?):\d+\)$")
PACKAGES = (
    ("affinity_node", "affinity_node"),
    ("aiohttp", "aiohttp"),
    ("multidict", "aiohttp"),
    ("yarl", "aiohttp"),
    ("aiohappyeyeballs", "aiohttp"),
    ("asyncio", "event loop"),
    ("uvloop", "event loop"),
    ("prometheus_client", "prometheus_client"),
    ("msgspec", "msgspec"),
    ("asyncpg", "asyncpg"),
)


def package(path: str) -> str:
    for needle, name in PACKAGES:
        if f"/{needle}/" in path or path.startswith(f"{needle}/"):
            return name
    return "other"


def summarise(lines: Iterable[str], top: int = 15) -> str:
    """py-spy's raw format (one `frame;frame;... count` line per stack) -> shares of samples
    by the package of the innermost frame, and our functions by self time."""
    by_package: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frame = _FRAME.match(stack.rsplit(";", 1)[-1])
        if frame is None:
            by_package["other"] += n
            continue
        where = package(frame["path"])
        by_package[where] += n
        if where == "affinity_node":
            path = frame["path"].split("affinity_node/", 1)[-1]
            ours[f"{frame['fn']} (affinity_node/{path})"] += n
    if not total:
        return "no samples"
    out = [f"{total} samples; by the package of the innermost frame:"]
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in by_package.most_common()]
    out.append(f"our functions by self time (top {top}):")
    out += [f"  {100 * n / total:5.1f}%  {name}" for name, n in ours.most_common(top)]
    return "\n".join(out)


def py_spy() -> str | None:
    """On PATH, or next to this interpreter (a venv's bin, when run without activating it)."""
    found = shutil.which("py-spy")
    if found is None:
        sibling = Path(sys.executable).parent / "py-spy"
        found = str(sibling) if sibling.exists() else None
    return found


def profile(target: str, size: str, mode: str, seconds: float, raw: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="affinity-profile-") as t, postgres(None) as dsn:
        tmp = Path(t)
        procs = bench.Procs(tmp)
        try:
            _key_id, secret = asyncio.run(bench._prepare_db(dsn))
            port = free_port()
            (tmp / "nginx.conf").write_text(bench.nginx_conf(tmp, port))
            nginx = procs.start(
                "nginx", ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")], 1
            )
            backend = f"http://127.0.0.1:{port}"
            bench.wait_ready(backend + "/health", nginx)
            if target.startswith("node"):
                proc, base = bench.start_node(procs, tmp, dsn, backend, 0, ledger=target == "node")
                bench.warm_up_node(base, secret)
            else:
                proc, base = bench.start_forwarder(
                    procs, backend, 0, http1=target.endswith("http1")
                )
            path, stream = bench.MODES[mode]
            body = bench.request_body(stream, size)
            bench.wrk(base + path, body, secret, 2, 1, tmp)  # warm-up
            spy = subprocess.Popen(
                [py_spy() or "py-spy", "record", "-p", str(proc.popen.pid), "-d", str(int(seconds)),
                 "-r", "250", "-f", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(0.5)  # py-spy attaches before the load starts
            run = bench.wrk(base + path, body, secret, seconds, 1, tmp)
            _out, err = spy.communicate(timeout=seconds + 30)
            if spy.returncode != 0:
                raise bench.BenchError(f"py-spy failed: {err.decode()[-500:]}")
        finally:
            procs.close()
    head = f"{target}, {size} {mode}: {run.rps:.0f} req/s under wrk -c{bench.CONNECTIONS}"
    return head + "\n" + summarise(raw.read_text().splitlines())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.profile_overhead",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument(
        "--target",
        choices=["node", "node-no-ledger", "forwarder", "forwarder-http1"],
        default="node",
        help="node-no-ledger: ledger.enabled off; forwarder-http1: with the node's client",
    )
    p.add_argument("--size", choices=list(bench.SIZES), default="tiny")
    p.add_argument("--mode", choices=list(bench.MODES), default="non-streaming")
    p.add_argument("--duration", type=float, default=10.0, help="seconds sampled (default 10)")
    p.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here (flamegraph input)")
    args = p.parse_args(argv)
    missing = [t for t in ("nginx", "wrk", "taskset") if shutil.which(t) is None]
    if py_spy() is None:
        missing.append("py-spy (pip install py-spy)")
    if missing:
        print(f"error: not on PATH: {', '.join(missing)}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    with tempfile.TemporaryDirectory() as t:
        raw = args.raw or Path(t) / "stacks.txt"
        try:
            print(profile(args.target, args.size, args.mode, args.duration, raw))
        except bench.BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
