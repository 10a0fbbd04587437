"""The LISTEN connection: dedicated (never pooled), probed when quiet, re-established forever.

Sequence on every (re)connect: LISTEN on every channel, then `on_synced` (the owner reloads its
snapshot), then watch. Notifications received before the snapshot finished are still applied
by the owner in version order, so nothing between LISTEN and the snapshot is lost.

asyncpg notices a terminated backend but not a frozen server or a cut network (no keepalive):
when no notification arrived for `probe_interval`, a short query with a timeout proves the
connection alive; a probe that fails terminates it and starts the reconnect path.

The watermark (with `on_watermark`): the highest version V such that every change with a
version up to V has reached this node, so that a reconnect can catch up from V. Versions come
from one sequence but transactions commit out of version order, so the newest version notified
proves nothing. Each probe (at least every `watermark_interval_s`, busy or not) reads the
sequence, then takes a snapshot S in a later statement: every transaction holding a version up
to V is then visible in S or in progress in S (the trigger takes the transaction id before the
version). V is settled once none of S's in-progress transactions is still running, and
reported one probe later: by then the notifications of those commits, sent at commit, have
crossed this connection ahead of the probe's answer. The pipeline restarts with each
connection; a candidate from a lost one is dropped.

Supervision: whatever ends a connection's watch (a lost or frozen connection, or an exception
of our own: a hook that raises) is caught, counted by kind (`on_failure`), and followed by a
reconnect: a listener that died would leave the node blind for good, silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from affinity_node.config import DsnSource
from affinity_node.observability.logs import RateLimitedLog
from affinity_node.store.postgres import DB_ERRORS, QueryLogger
from affinity_node.store.queries import QUERIES as Q
from affinity_node.tasks import stop_all

log = logging.getLogger(__name__)

Handler = Callable[[str], None]

FailureKind = Literal["database", "internal"]
"""database: the connection was lost, a probe failed or Postgres refused; internal: an
exception of ours (a bug in a hook), logged with its traceback."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    dsn: DsnSource
    """A DSN, or a function called at every (re)connect (`database.dsn_file`)."""
    probe_interval_s: float = 0.75
    probe_timeout_s: float = 1.0
    """Together: a frozen server is noticed within ~2 s even when nothing is notified."""
    connect_timeout_s: float = 2.0
    sync_timeout_s: float = 30.0
    """Connect, LISTEN and `on_synced` together (keys, and a catch-up or the start of a paged
    snapshot: never a whole table); a server that freezes midway is left."""
    watermark_interval_s: float = 1.0
    """The longest time between probes while notifications keep coming (the watermark lags
    about two of these)."""
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    application_name: str = "affinity-node-listener"


def keep_alive(conn: asyncpg.Connection) -> None:
    """TCP keepalives on the listener's socket (asyncpg sets none): a peer that vanished is
    noticed by the kernel too, not only by the probe. Unix sockets need none."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class DbClockOffset:
    """The database clock minus the local wall clock (seconds), as the listener's latest probe
    measured it. Made before the listener and the engine: the listener writes it, the engine
    calls it to date notifications against the database clock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def __call__(self) -> float:
        return self.value


class ChangeListener:
    def __init__(
        self,
        settings: ListenerSettings,
        handlers: Mapping[str, Handler],
        on_synced: Callable[[], Awaitable[None]],
        on_state: Callable[[bool], None],
        on_reconnect: Callable[[], None] | None = None,
        on_query: QueryLogger | None = None,
        on_watermark: Callable[[int], None] | None = None,
        on_failure: Callable[[FailureKind], None] | None = None,
        clock: DbClockOffset | None = None,
    ) -> None:
        """`on_watermark` hears the binding table's watermark as it advances (see above);
        `on_failure` hears every failure that ends a connection or an attempt at one; `clock`
        receives the database clock's offset at every probe."""
        self._s = settings
        self._handlers = dict(handlers)
        self._on_synced = on_synced
        self._on_state = on_state
        self._on_reconnect = on_reconnect
        self._on_query = on_query
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._last_activity = time.monotonic()
        self._last_probe = time.monotonic()
        self._on_watermark = on_watermark
        self._on_failure = on_failure
        self._candidate: tuple[int, str] | None = None
        """(version, snapshot) read by a probe, waiting for that snapshot's transactions."""
        self._settled: int | None = None
        """A version settled at the last probe: reported at the next one."""
        self._conn: asyncpg.Connection | None = None
        self._warn = RateLimitedLog(log)
        self._last_internal_log = -math.inf
        self.clock = clock if clock is not None else DbClockOffset()
        """Database clock minus local wall clock, from the latest probe (seconds)."""
        self.probes = 0
        """Probes that answered (each one a step of the watermark)."""

    @property
    def clock_offset(self) -> float:
        return self.clock.value

    @property
    def up(self) -> bool:
        return self._synced.is_set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="affinity-listener")

    async def wait_synced(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        return self._synced.is_set()

    async def stop(self) -> None:
        await stop_all(self._task)
        self._task = None
        await self._drop()

    async def _run(self) -> None:
        """Supervises the connections, forever: nothing but cancellation ends it."""
        first = True
        pause = self._s.backoff_initial_s
        while True:
            try:
                await self._session(first)
                pause = self._s.backoff_initial_s
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self._s.backoff_max_s)
            first = False

    async def _session(self, first: bool) -> None:
        """One connection: connect and sync (retried with backoff), then watch until lost."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=self._s.backoff_initial_s, max=self._s.backoff_max_s)
            + wait_random(0, self._s.backoff_initial_s),
            # Anything, not only database errors: a listener that dies leaves the node
            # blind, so a bug in a sync hook is logged and retried like an outage.
            retry=retry_if_exception_type(Exception),
            before_sleep=lambda rs: self._failed(rs.outcome.exception() if rs.outcome else None),
        )
        lost = asyncio.Event()
        async for attempt in retrying:
            with attempt:
                async with asyncio.timeout(self._s.sync_timeout_s):
                    lost = await self._connect_and_sync()
        try:
            if not first and self._on_reconnect is not None:
                self._on_reconnect()
            self._synced.set()
            self._on_state(True)
            log.info("listener connected and synced")
            await self._watch(lost)
            self._count("database")
        finally:
            self._synced.clear()
            self._on_state(False)
            await self._drop()
        self._warn.warning("lost", "listener connection lost; reconnecting")

    def _failed(self, exc: BaseException | None) -> None:
        """A failed attempt or a watch ended by an exception: counted, and logged (ours with
        a traceback, at error level, rate-limited like the rest)."""
        if exc is None or isinstance(exc, DB_ERRORS):
            self._count("database")
            self._warn.warning("connect", "listener cannot reach Postgres: %r", exc)
            return
        self._count("internal")
        now = time.monotonic()
        if now - self._last_internal_log >= 10.0:
            self._last_internal_log = now
            log.error("listener failed; reconnecting", exc_info=exc)

    def _count(self, kind: FailureKind) -> None:
        if self._on_failure is not None:
            with contextlib.suppress(Exception):
                self._on_failure(kind)

    async def _connect_and_sync(self) -> asyncio.Event:
        await self._drop()
        lost = asyncio.Event()
        dsn = self._s.dsn
        conn = await asyncpg.connect(
            dsn() if callable(dsn) else dsn,
            timeout=self._s.connect_timeout_s,
            server_settings={"application_name": self._s.application_name},
        )
        self._conn = conn
        self._candidate = self._settled = None
        keep_alive(conn)
        if self._on_query is not None:
            conn.add_query_logger(self._on_query)
        conn.add_termination_listener(lambda _c: lost.set())
        for channel, handler in self._handlers.items():
            await conn.add_listener(channel, self._wrap(handler))
        await self._probe(conn)
        await self._on_synced()
        self._last_activity = time.monotonic()
        return lost

    def _wrap(self, handler: Handler) -> Callable[[object, int, str, str], None]:
        # A plain function: asyncpg runs these in server order (coroutines would interleave).
        def callback(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            self._last_activity = time.monotonic()
            try:
                handler(payload)
            except Exception:  # a bad payload must never kill the listener
                log.exception("notification handler failed")

        return callback

    async def _probe(self, conn: asyncpg.Connection) -> None:
        self._last_probe = time.monotonic()
        if self._on_watermark is None:
            before = time.time()
            async with asyncio.timeout(self._s.probe_timeout_s):
                db_now: float = await conn.fetchval(Q["db_clock"])
            self.clock.value = db_now - (before + time.time()) / 2
            self.probes += 1
            return
        candidate = self._candidate
        async with asyncio.timeout(self._s.probe_timeout_s):
            version: int = await conn.fetchval(Q["listener_version"])
            before = time.time()
            db_now, snapshot, settled = await conn.fetchrow(
                Q["listener_snapshot"], candidate[1] if candidate is not None else None
            )
        self.clock.value = db_now - (before + time.time()) / 2
        self.probes += 1
        if self._settled is not None:
            self._on_watermark(self._settled)
            self._settled = None
        if candidate is not None and settled:
            self._settled, candidate = candidate[0], None
        if candidate is None:
            candidate = (version, snapshot)
        self._candidate = candidate

    async def _watch(self, lost: asyncio.Event) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            now = time.monotonic()
            wait = min(
                self._s.probe_interval_s - (now - self._last_activity),
                self._s.watermark_interval_s - (now - self._last_probe),
            )
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await lost.wait()
                if lost.is_set():
                    return
                continue
            try:
                await self._probe(conn)
            except DB_ERRORS as exc:
                self._warn.warning("probe", "listener probe failed: %r", exc)
                return
            self._last_activity = time.monotonic()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
