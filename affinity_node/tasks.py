"""The node's background tasks: one way to run something periodically, one way to stop tasks.

Every periodic duty of a node (health checks, load polls, DNS, key upkeep, ledger flushes, the
mover, health reports) runs through `every`, so each has the same shape: jittered (nodes
started together do not hit Postgres or the backends in step), an exception ends one round,
never the task (logged rate-limited, counted on the task), and `stop()` cancels and awaits.
`stop_all` / `stopping` are the one cancel-and-await for any task, so a node's stop never
leaves a task running nor swallows the cancellation of the code that stops it. One-shot
writes that a stop must let finish (a rebind after a failover, a set change) go in `Pending`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
"""A failing task logs its error (with the traceback) at most this often."""


class Periodic:
    """A running periodic task (made by `every`)."""

    def __init__(
        self,
        interval_s: float,
        fn: Callable[[], object],
        name: str,
        jitter: float,
        now: bool,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"{name}: interval must be positive, not {interval_s}")
        if not 0 <= jitter < 1:
            raise ValueError(f"{name}: jitter must be in [0, 1), not {jitter}")
        self.name = name
        self.interval_s = interval_s
        self._fn = fn
        self._jitter = jitter
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0
        self.runs = 0
        """Rounds that ended, failed ones included."""
        self.errors = 0
        """Rounds that raised."""
        self.task = asyncio.get_running_loop().create_task(self._loop(now), name=name)

    def _pause(self) -> float:
        return self.interval_s * random.uniform(1 - self._jitter, 1 + self._jitter)

    async def _loop(self, now: bool) -> None:
        if not now:
            await asyncio.sleep(self._pause())
        while True:
            started = time.monotonic()
            await self._round()
            # Start to start; a round that overran still leaves a pause (no busy loop on a
            # dead database whose every statement times out).
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(self._pause() - elapsed, self.interval_s * self._jitter))

    async def _round(self) -> None:
        try:
            result = self._fn()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # the task must outlive any one bad round
            self.errors += 1
            self._log(exc)
        finally:
            self.runs += 1

    def _log(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            self._unlogged += 1
            return
        self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        log.error("%s: round failed (%d more not logged)", self.name, unlogged, exc_info=exc)

    def cancel(self) -> None:
        self.task.cancel()

    async def stop(self) -> None:
        """Cancel, and return once the task ended."""
        await stop_all(self.task)


def every(
    interval_s: float,
    fn: Callable[[], object],
    name: str,
    *,
    jitter: float = 0.1,
    now: bool = False,
) -> Periodic:
    """Run `fn()` (a coroutine function, or a plain one) every `interval_s` (start to start,
    each pause jittered by +-`jitter` of it), until stopped. The first run is one (jittered)
    interval after this call, or at once with `now=True`. An exception ends the round only:
    logged with its traceback (at most every LOG_EVERY_S per task, with a count of the ones
    not logged) and counted in `errors`. Call it on the running loop."""
    return Periodic(interval_s, fn, name, jitter, now)


Stoppable = asyncio.Task[Any] | asyncio.Future[Any] | Periodic | None


STOP_GRACE_S = 5.0
"""How long a cancelled task may take to end. A task cancelled inside a database call can
wait on the driver's own cancellation, which a frozen server never answers: a stop does not
wait for that forever (the task is left cancelling; the process is stopping anyway)."""


async def stop_all(*tasks: Stoppable, grace_s: float = STOP_GRACE_S) -> None:
    """Cancel each task, then wait until all ended, up to `grace_s`. What a task raised is
    logged, not raised; a cancellation of the caller itself still propagates (the tasks are
    cancelled anyway)."""
    live = [t.task if isinstance(t, Periodic) else t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    _done, stuck = await asyncio.wait(live, timeout=grace_s)
    for task in stuck:
        log.warning("task %s did not end within %g s of its cancellation", _name(task), grace_s)
    for task in live:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", _name(task), exc_info=task.exception())


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


@asynccontextmanager
async def stopping(*tasks: Stoppable) -> AsyncIterator[None]:
    """`async with stopping(task, ...):` stops them when the block ends, however it ends."""
    try:
        yield
    finally:
        await stop_all(*tasks)


class Pending:
    """One-shot background tasks that a stop lets finish rather than cancels (a write the
    request path started and must not wait for). Held here while they run: the event loop
    keeps only weak references to tasks."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Return once every task started so far ended (what they raised is dropped: each
        one reports its own failures)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
