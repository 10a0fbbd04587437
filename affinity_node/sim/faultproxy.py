"""A loopback TCP proxy in front of the real Postgres that can cut or freeze the network.

`stop()` closes every connection and refuses new ones (what a node sees when Postgres stops);
`freeze()` keeps sockets open but forwards nothing (a hung server or a cut cable, which
asyncpg does not notice by itself); `start()` heals.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

from affinity_node.sim.support import unix_socket_of


class FaultProxy:
    def __init__(self, target_dsn: str) -> None:
        self._target_dsn = target_dsn
        self._unix = unix_socket_of(target_dsn)
        parts = urlsplit(target_dsn)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0

    @property
    def dsn(self) -> str:
        parts = urlsplit(self._target_dsn)
        user = parts.username or "postgres"
        auth = f"{user}:{parts.password}@" if parts.password else f"{user}@"
        return urlunsplit(("postgresql", f"{auth}127.0.0.1:{self.port}", parts.path, "", ""))

    async def start(self) -> None:
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def refuse_new(self) -> None:
        """Refuse new connections; the open ones keep working."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        await self.refuse_new()
        self._reset_all()

    def freeze(self) -> None:
        self._flowing.clear()

    def _reset_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()
        for t in list(self._pipes):
            t.cancel()

    async def close(self) -> None:
        await self.stop()
        if self._pipes:
            await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._unix:
                up_r, up_w = await asyncio.open_unix_connection(self._unix)
            else:
                up_r, up_w = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_w))
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.transport.abort()
            self._writers.discard(dst)
