"""When to stop asking the store, and how to find out it is back.

Closed: every miss may ask the store. After a failure that looks like an outage (connection
lost, timeout), open: nobody asks for a pause. When the pause is over, the next caller starts
one trial in the background (half-open) and is answered without the store like everyone else;
the trial's success closes the breaker, its failure opens it again for a longer pause. No
request ever waits on a store that just failed: after the first failure, misses degrade at
once, whatever the store does (a frozen host answers nothing and resets nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from affinity_node.routing.ports import Clock, StoreUnavailable
from affinity_node.tasks import stop_all


class StoreBreaker:
    def __init__(
        self,
        trial: Callable[[], Awaitable[None]],
        on_change: Callable[[bool], None],
        clock: Clock,
        pause_s: float = 1.0,
        max_pause_s: float = 10.0,
    ) -> None:
        self._trial_call = trial
        self._on_change = on_change
        self._clock = clock
        self._first_pause = pause_s
        self._max_pause = max_pause_s
        self._pause = pause_s
        self._open_until: float | None = None
        self._trial: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._open_until is None

    def allows(self) -> bool:
        """Whether a caller may ask the store now; starts the trial when one is due."""
        open_until = self._open_until
        if open_until is None:
            return True
        if self._trial is None and self._clock() >= open_until:
            self._trial = asyncio.get_running_loop().create_task(self._run_trial())
        return False

    def failed(self) -> None:
        """The store looks down: open (again), with a longer pause after a failed trial."""
        was_closed = self._open_until is None
        self._open_until = self._clock() + self._pause
        if not was_closed:
            self._pause = min(self._pause * 2, self._max_pause)
        if was_closed:
            self._on_change(False)

    def trip(self) -> None:
        """Something else saw the database go away (the listener): open, trial due at once."""
        if self._open_until is None:
            self._open_until = self._clock()
            self._on_change(False)

    def succeeded(self) -> None:
        self._pause = self._first_pause
        if self._open_until is not None:
            self._open_until = None
            self._on_change(True)

    async def _run_trial(self) -> None:
        try:
            await self._trial_call()
        except StoreUnavailable:
            self.failed()
        else:
            self.succeeded()
        finally:
            self._trial = None

    async def stop(self) -> None:
        trial, self._trial = self._trial, None
        await stop_all(trial)
