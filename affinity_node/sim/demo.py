"""`affinity-node demo`: a whole fleet on one machine, the same workload three ways.

Starts Postgres (embedded unless `--dsn`), N fake vLLM backends, M proxy nodes and HAProxy in
front of them when the binary exists, then runs one multi-tenant chat workload three times:

1. affinity off: every request goes to the least busy backend (what a plain balancer does);
2. node-local affinity (`affinity.store: memory`): each node pins pairs on its own, as routers
   without shared state do; behind a load balancer the nodes pin the same pair to different
   backends, so a tenant's prefixes are spread (and duplicated) over several caches;
3. shared affinity (`affinity.store: postgres`): one binding per pair for every node.

Between runs the nodes restart with the next config and the backends' prefix caches are
cleared, so each run starts cold; figures are deltas over the run. The backends' caches are
sized like a real fleet's: none can hold every tenant's prefixes, all together can.

Every child process runs in its own session (Ctrl-C at the terminal reaches only this
driver, which then stops them in order); all are stopped, and temporary files removed, on
success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import asyncpg
import yaml

from affinity_node.sim.report import (
    ProgressLine,
    RunReport,
    build_report,
    deltas,
    render_table,
    report_json,
    scrape_all,
)
from affinity_node.sim.workload import Workload, WorkloadConfig, estimate_working_set_blocks

MODEL = "llama-3.1-8b"
DSN_ENV = "AFFINITY_DATABASE_DSN"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
FLEET_CAPACITY = 1.2
"""All backends' caches together hold this many times the workload's prefix blocks; each
holds FLEET_CAPACITY / N of it (0.3 with 4 backends): a pinned tenant fits, every tenant
on every backend does not."""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    affinity: dict[str, Any]


SCENARIOS = (
    Scenario("off", "affinity off", {"enabled": False}),
    Scenario("node_local", "node-local affinity", {"enabled": True, "store": "memory"}),
    Scenario("shared", "shared affinity", {"enabled": True, "store": "postgres"}),
)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why (with the failing process's log tail)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- processes -----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "    (no log)"
        return "\n".join(f"    {line}" for line in text[-lines:]) or "    (empty log)"


class Processes:
    """Every child the demo starts; each leads its own process group, stopped as a group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_")}
        # Config files say everything; an AFFINITY_* variable of the caller would override them.

    async def start(self, name: str, argv: Sequence[str]) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, env=self._env, start_new_session=True,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    @staticmethod
    def _signal(child: Child, sig: signal.Signals) -> None:
        if child.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, sig)

    async def stop(self, children: Sequence[Child], timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to each group, wait, SIGKILL what is left. Cancellation still kills all."""
        try:
            for child in children:
                self._signal(child, signal.SIGTERM)
            for child in children:
                try:
                    await asyncio.wait_for(child.proc.wait(), timeout_s)
                except TimeoutError:
                    self._signal(child, signal.SIGKILL)
                    await child.proc.wait()
        except BaseException:
            for child in children:
                self._signal(child, signal.SIGKILL)
            raise
        finally:
            for child in children:
                if not child.running and child in self.children:
                    self.children.remove(child)

    async def close(self) -> None:
        await self.stop(list(reversed(self.children)))


async def _poll(
    check: Callable[[], Awaitable[bool]], child: Child | None, what: str,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Polls `check` until true; fails at the deadline or as soon as `child` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None and not child.running:
            raise DemoError(f"{child.name} exited with {child.proc.returncode} before {what}:\n"
                            f"{child.tail()}")
        if await check():
            return
        if time.monotonic() > deadline:
            tail = f":\n{child.tail()}" if child is not None else ""
            raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")
        await asyncio.sleep(0.05)


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def wait_http_ok(session: aiohttp.ClientSession, url: str, child: Child | None,
                       what: str) -> None:
    async def ok() -> bool:
        return await _status(session, url) == 200

    await _poll(ok, child, what)


# -- haproxy ---------------------------------------------------------------------------------


def haproxy_config(port: int, stats_port: int, node_ports: Sequence[int],
                   balance: str = "leastconn") -> str:
    servers = "\n".join(
        f"    server node-{i} 127.0.0.1:{p} check" for i, p in enumerate(node_ports))
    return f"""\
# Generated by `affinity-node demo`.
global
    maxconn 4096
    nbthread 1

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    # Streams last as long as the model writes: a short server timeout would cut them.
    timeout server 600s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout check 2s
    # No idle server connections: a node restarted between runs leaves none half-dead.
    option http-server-close
    # A node that refuses the connection or closes it without a byte served nothing: retry
    # elsewhere (the request is buffered for that).
    option http-buffer-request
    retries 2
    option redispatch 1
    retry-on conn-failure empty-response
    # Send each SSE chunk at once: by default HAProxy may hold small writes back (MSG_MORE)
    # while the response is incomplete, and a stream's first token would wait for later ones.
    option http-no-delay

frontend api
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance {balance}
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


def haproxy_status(csv_text: str, backend: str = "nodes") -> dict[str, str]:
    """Server name -> status ("UP", "DOWN", "UP 1/2", ...) from HAProxy's `stats;csv`."""
    lines = csv_text.splitlines()
    if not lines or not lines[0].startswith("# "):
        return {}
    header = lines[0][2:].split(",")
    try:
        px, sv, st = header.index("pxname"), header.index("svname"), header.index("status")
    except ValueError:
        return {}
    status = {}
    for line in lines[1:]:
        cols = line.split(",")
        if len(cols) > st and cols[px] == backend and cols[sv] not in ("FRONTEND", "BACKEND"):
            status[cols[sv]] = cols[st]
    return status


async def haproxy_servers_up(session: aiohttp.ClientSession, stats_url: str,
                             names: Sequence[str]) -> bool:
    """True when HAProxy's own health checks show every node server exactly UP (a server
    in transition shows "UP 1/2" or "DOWN 1/2")."""
    try:
        async with session.get(stats_url + ";csv",
                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return False
    status = haproxy_status(text)
    return all(status.get(n) == "UP" for n in names)


def find_haproxy() -> str | None:
    """On PATH, or in /usr/sbin where Debian puts it (often off a non-root user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


# -- the fleet -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Ports and processes of one demo; nodes are restarted per scenario."""

    procs: Processes
    session: aiohttp.ClientSession
    tmp: Path
    dsn: str
    backend_ports: list[int]
    node_ports: list[int]
    lb_url: str | None = None
    stats_url: str | None = None
    nodes: list[Child] | None = None
    node_log_level: str = "WARNING"

    @property
    def backend_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.backend_ports]

    @property
    def node_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.node_ports]

    @property
    def backend_ids(self) -> list[str]:
        return [f"b{i}" for i in range(len(self.backend_ports))]

    async def start_backends(self, cache_blocks: int, prefill_s: float, output_tokens: int,
                             seed: int) -> None:
        children = []
        for i, port in enumerate(self.backend_ports):
            children.append(await self.procs.start(f"backend-b{i}", [
                sys.executable, "-m", "affinity_node", "fake-backend",
                "--host", "127.0.0.1", "--port", str(port), "--id", f"b{i}", "--model", MODEL,
                "--cache-blocks", str(cache_blocks), "--ttft-base", "0.01",
                "--prefill-per-token", str(prefill_s), "--tokens-per-s", "2000",
                "--output-tokens", str(output_tokens), "--max-running", "256",
                "--seed", str(seed + i),
            ]))
        await asyncio.gather(*(
            wait_http_ok(self.session, f"{url}/health", child, f"{child.name} to serve")
            for url, child in zip(self.backend_urls, children, strict=True)))

    async def start_haproxy(self, binary: str, balance: str) -> None:
        port, stats_port = free_port(), free_port()
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, stats_port, self.node_ports, balance))
        check = await asyncio.create_subprocess_exec(
            binary, "-c", "-q", "-f", str(cfg), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL)
        out, _ = await check.communicate()
        if check.returncode != 0:
            raise DemoError(f"haproxy rejected the generated config:\n{out.decode()}")
        self.lb_url = f"http://127.0.0.1:{port}"
        self.stats_url = f"http://127.0.0.1:{stats_port}/stats"
        child = await self.procs.start("haproxy", [binary, "-db", "-f", str(cfg)])
        await wait_http_ok(self.session, self.stats_url, child, "haproxy to listen")

    def _node_config(self, i: int, scenario: Scenario) -> Path:
        cfg = {
            "node_id": f"demo-node-{i}",
            "listen": {"host": "127.0.0.1", "port": self.node_ports[i]},
            "database": {"dsn": self.dsn, "pool_max": 4, "statement_timeout_ms": 2000},
            "affinity": {"ttl_seconds": 900, **scenario.affinity},
            "routing": {"fallback": "least_outstanding"},
            "health": {"interval_seconds": 1.0},
            "limits": {"drain_timeout_seconds": 5},
            "logging": {"level": self.node_log_level, "json": False},
            "backends": [{"url": u, "models": [MODEL], "kind": "vllm"}
                         for u in self.backend_urls],
            "models": [{"name": MODEL, "affinity": True}],
        }
        path = self.tmp / f"node-{i}-{scenario.key}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    async def start_nodes(self, scenario: Scenario) -> None:
        children = []
        for i in range(len(self.node_ports)):
            path = self._node_config(i, scenario)
            children.append(await self.procs.start(f"node-{i}-{scenario.key}", [
                sys.executable, "-m", "affinity_node", "serve", "--config", str(path)]))
        self.nodes = children
        await asyncio.gather(*(
            wait_http_ok(self.session, f"{url}/readyz", child, f"{child.name} to be ready")
            for url, child in zip(self.node_urls, children, strict=True)))
        if self.stats_url is not None:
            names = [f"node-{i}" for i in range(len(self.node_ports))]
            stats_url = self.stats_url

            async def up() -> bool:
                return await haproxy_servers_up(self.session, stats_url, names)

            await _poll(up, None, "haproxy to see every node up")

    async def stop_nodes(self) -> None:
        if self.nodes:
            await self.procs.stop(self.nodes)
            self.nodes = None

    async def clear_caches(self) -> None:
        async def clear(url: str) -> None:
            async with self.session.post(f"{url}/admin/cache/clear",
                                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
                resp.raise_for_status()

        await asyncio.gather(*(clear(u) for u in self.backend_urls))

    async def scrape(self) -> tuple[dict[str, Any], dict[str, Any]]:
        backends = dict(zip(self.backend_ids, (f"{u}/metrics" for u in self.backend_urls),
                            strict=True))
        nodes = {f"node-{i}": f"{u}/metrics" for i, u in enumerate(self.node_urls)}
        b, n = await asyncio.gather(scrape_all(self.session, backends),
                                    scrape_all(self.session, nodes))
        return b, n


# -- keys ----------------------------------------------------------------------------------


async def create_keys(dsn: str, n: int, prefix: str) -> tuple[list[uuid.UUID], list[str]]:
    from affinity_node.store.keys import create_key

    conn = await asyncpg.connect(dsn)
    try:
        ids, secrets = [], []
        for i in range(n):
            key, secret = await create_key(conn, f"{prefix}-tenant-{i:02d}")
            ids.append(key.id)
            secrets.append(secret)
        return ids, secrets
    finally:
        await conn.close()


async def delete_keys(dsn: str, ids: Sequence[uuid.UUID]) -> None:
    """Removes the demo's keys (and, by cascade, their bindings) from a database it borrowed."""
    from affinity_node.store.keys import delete_key

    conn = await asyncpg.connect(dsn)
    try:
        for key_id in ids:
            await delete_key(conn, key_id)
    finally:
        await conn.close()


# -- the demo --------------------------------------------------------------------------------


def workload_config(args: argparse.Namespace, base_urls: Sequence[str],
                    secrets: Sequence[str]) -> WorkloadConfig:
    rate = None if args.concurrency else args.rate
    return WorkloadConfig(
        base_urls=tuple(base_urls), api_keys=tuple(secrets), models=(MODEL,),
        tenants=args.keys, conversations_per_tenant=args.conversations,
        max_turns=args.max_turns, max_tokens=args.output_tokens, rate=rate,
        concurrency=args.concurrency or None, duration_s=args.duration, seed=args.seed,
        spread="round_robin",
    )


def cache_blocks_for(cfg: WorkloadConfig, backends: int, expected_requests: int,
                     fleet_capacity: float = FLEET_CAPACITY) -> int:
    """Per-backend cache: `fleet_capacity` x the run's prefix blocks, split over the fleet."""
    blocks = estimate_working_set_blocks(cfg, expected_requests=expected_requests)
    return max(64, math.ceil(blocks * fleet_capacity / backends))


def _log_dir(path: str) -> Path:
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, out: IO[str]) -> int:
    haproxy = None if args.no_haproxy else find_haproxy()
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="affinity-demo-")))
        log_dir = _log_dir(args.log_dir) if args.log_dir else tmp
        from affinity_node.bench.postgres import postgres
        from affinity_node.store.migrate import migrate

        if args.dsn is None:
            _say("starting an embedded Postgres ...")
        with warnings.catch_warnings():  # platformdirs' XDG_RUNTIME_DIR notice, as root
            warnings.simplefilter("ignore")
            dsn = stack.enter_context(postgres(args.dsn))
        await migrate(dsn)
        run_id = uuid.uuid4().hex[:8]
        key_ids, secrets = await create_keys(dsn, args.keys, f"demo-{run_id}")
        if args.dsn is not None:
            stack.push_async_callback(delete_keys, dsn, key_ids)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        procs = Processes(log_dir)
        stack.push_async_callback(procs.close)
        fleet = Fleet(procs, session, tmp, dsn,
                      backend_ports=[free_port() for _ in range(args.backends)],
                      node_ports=[free_port() for _ in range(args.nodes)],
                      node_log_level="INFO" if args.log_dir else "WARNING")

        probe = workload_config(args, ["http://unused"], secrets)
        expected = (round(args.rate * args.duration) if probe.rate is not None
                    else args.concurrency * 20 * math.ceil(args.duration))
        cache_blocks = cache_blocks_for(probe, args.backends, expected, args.fleet_cache)
        _say(f"starting {args.backends} fake backends (prefix cache {cache_blocks} blocks "
             f"each, prefill {args.prefill_per_token * 1000:.2f} ms per uncached token) ...")
        await fleet.start_backends(cache_blocks, args.prefill_per_token, args.output_tokens,
                                   args.seed)
        if haproxy is not None:
            await fleet.start_haproxy(haproxy, args.balance)
            assert fleet.lb_url is not None
            base_urls = [fleet.lb_url]
            _say(f"haproxy ({haproxy}) balances {args.balance} over {args.nodes} nodes "
                 f"at {fleet.lb_url}")
            notes.append(f"traffic through haproxy (balance {args.balance}) over {args.nodes} "
                         "nodes")
        else:
            base_urls = fleet.node_urls
            why = "--no-haproxy given" if args.no_haproxy else "no haproxy binary found"
            msg = (f"{why}: the load generator spreads requests round-robin over the "
                   f"{args.nodes} nodes itself")
            _say(msg)
            notes.append(msg)
        cfg = workload_config(args, base_urls, secrets)
        load = (f"{cfg.rate:g} req/s Poisson" if cfg.rate is not None
                else f"{cfg.concurrency} concurrent")
        notes.append(
            f"workload: {cfg.tenants} tenants (API keys) x {cfg.conversations_per_tenant} "
            f"conversations, system prompts {cfg.system_tokens[0]}-{cfg.system_tokens[1]} "
            f"tokens, up to {cfg.max_turns} turns, {load}, {cfg.duration_s:g} s per run, "
            f"streaming, seed {cfg.seed}")
        notes.append(
            f"{args.backends} backends x {cache_blocks} cache blocks (16 tokens) = "
            f"{args.fleet_cache:g}x the workload's estimated prefix blocks; prefix-cache hit "
            f"rate = hit tokens / queried tokens on the backends over each run")

        reports: list[RunReport] = []
        for n, scenario in enumerate(SCENARIOS, 1):
            label = f"[{n}/{len(SCENARIOS)} {scenario.title}]"
            _say(f"{label} starting {args.nodes} nodes ...")
            await fleet.clear_caches()
            await fleet.start_nodes(scenario)
            before = await fleet.scrape()
            workload = Workload(cfg)
            progress = ProgressLine(label, cfg.duration_s)
            result = await workload.run(progress)
            progress.finish(workload.stats)
            after = await fleet.scrape()
            reports.append(build_report(
                scenario.title, result, deltas(before[0], after[0]), deltas(before[1], after[1]),
                backends=fleet.backend_ids))
            await fleet.stop_nodes()

        table = render_table(reports, notes)
        if args.json:
            _say(table)
            doc = report_json(reports, notes, scenarios=[s.key for s in SCENARIOS],
                              haproxy=haproxy is not None, backends=args.backends,
                              nodes=args.nodes, cache_blocks=cache_blocks,
                              workload={
                                  "tenants": cfg.tenants,
                                  "conversations_per_tenant": cfg.conversations_per_tenant,
                                  "max_turns": cfg.max_turns,
                                  "system_tokens": list(cfg.system_tokens),
                                  "rate": cfg.rate, "concurrency": cfg.concurrency,
                                  "duration_s": cfg.duration_s, "seed": cfg.seed,
                                  "fleet_cache": args.fleet_cache,
                                  "prefill_s_per_token": args.prefill_per_token,
                              })
            print(json.dumps(doc, indent=2), file=out, flush=True)
        else:
            print(table, file=out, flush=True)
        errors = sum(r.errors for r in reports)
        if errors:
            _say(f"{errors} request(s) failed")
            return 1
        return 0
    raise AssertionError("unreachable")  # pragma: no cover - mypy: the stack never swallows


async def run_demo(args: argparse.Namespace) -> int:
    """The `demo` command: 0 when every request succeeded, 1 otherwise; 130/143 on a signal."""
    if args.backends < 1 or args.nodes < 1 or args.keys < 1 or args.conversations < 1:
        _say("error: --backends, --nodes, --keys and --conversations must be >= 1")
        return 2
    if args.duration <= 0 or args.rate <= 0 or args.concurrency < 0 or args.fleet_cache <= 0:
        _say("error: --duration, --rate and --fleet-cache must be > 0, --concurrency >= 0")
        return 2
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(sig: signal.Signals) -> None:
        if not received:
            _say(f"\n{sig.name}: stopping everything ...")
        received.append(int(sig))
        task.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        return await _run(args, sys.stdout)
    except asyncio.CancelledError:
        if not received:
            raise
        return 128 + received[0]
    except DemoError as exc:
        _say(f"error: {exc}")
        return 1
    except (aiohttp.ClientError, OSError, asyncpg.PostgresError) as exc:
        _say(f"error: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def add_demo_parser(subparsers: Any) -> None:
    """Registers `demo` on an argparse subparsers object (`affinity-node demo ...`)."""
    p = subparsers.add_parser(
        "demo", help="run a local fleet and compare affinity off / node-local / shared",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    configure_parser(p)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=int, default=4, help="fake vLLM backends (default 4)")
    p.add_argument("--nodes", type=int, default=3, help="proxy nodes (default 3)")
    p.add_argument("--duration", type=float, default=18.0,
                   help="seconds of load per run; three runs (default 18, about a minute)")
    p.add_argument("--keys", type=int, default=40, help="tenants, one API key each (default 40)")
    p.add_argument("--conversations", type=int, default=2,
                   help="conversations per tenant (default 2)")
    p.add_argument("--max-turns", type=int, default=16,
                   help="turns before a conversation starts over (default 16)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="Poisson arrivals per second (default 50)")
    p.add_argument("--concurrency", type=int, default=0,
                   help="fixed number of requests in flight instead of --rate")
    p.add_argument("--output-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--prefill-per-token", type=float, default=0.0002,
                   help="backend seconds per uncached prompt token (default 0.0002)")
    p.add_argument("--fleet-cache", type=float, default=FLEET_CAPACITY,
                   help="all backends' prefix caches together hold this multiple of the "
                        f"workload's prefix blocks (default {FLEET_CAPACITY:g})")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dsn", default=os.environ.get(DSN_ENV) or None,
                   help=f"use this Postgres (default: ${DSN_ENV}, else an embedded one); the "
                        "demo's keys are deleted from it at the end")
    p.add_argument("--json", action="store_true",
                   help="print the JSON report on stdout (the table goes to stderr)")
    p.add_argument("--log-dir", metavar="DIR",
                   help="keep the child processes' logs here (default: a temporary directory "
                        "removed at the end)")
    p.add_argument("--balance", choices=["leastconn", "roundrobin"], default="leastconn",
                   help="HAProxy's balance algorithm over the nodes (default leastconn)")
    p.add_argument("--no-haproxy", action="store_true",
                   help="no load balancer: the generator spreads requests over the nodes")
    p.set_defaults(func=run_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m affinity_node.sim.demo ...` until the command is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="affinity-node demo", description=__doc__)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
