"""The largest queue each backend had during a run, read from its /metrics while it goes.

Counters can be read before and after a run; a queue cannot: it grows and drains within the
run. So the sampler reads every backend's `vllm:num_requests_waiting` (and running, KV usage;
llama.cpp's `llamacpp:requests_deferred` and `_processing`)
a few times a second and keeps the maxima. It reads the lines it needs instead of parsing the
whole page: it runs next to the load it measures, on the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
ALIASES = {"llamacpp:requests_processing": RUNNING, "llamacpp:requests_deferred": WAITING}
"""llama.cpp's names for the same gauges (its busy slots and its queue), read as vLLM's."""


def read_gauges(
    text: str, names: tuple[str, ...] = (WAITING, RUNNING, KV_USAGE)
) -> dict[str, float]:
    """Sums of the named gauges over their series, from Prometheus text (other lines skipped);
    llama.cpp's gauges count under vLLM's names (ALIASES)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(("vllm:", "llamacpp:")):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        name = ALIASES.get(name, name)
        if name not in names:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


@dataclass
class BackendPeaks:
    """Maxima seen on one backend since the last reset."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    samples: int = 0


@dataclass
class LoadSampler:
    """Polls each backend's /metrics every `interval_s` (name -> URL) and keeps peaks."""

    session: aiohttp.ClientSession
    urls: Mapping[str, str]
    interval_s: float = 0.25
    peaks: dict[str, BackendPeaks] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forgets what was seen: the measured part of a run starts now."""
        self.peaks = {name: BackendPeaks() for name in self.urls}

    @property
    def max_waiting(self) -> dict[str, float]:
        return {name: p.waiting for name, p in self.peaks.items()}

    async def sample(self) -> None:
        """One round over every backend; an unreadable one is skipped this round."""
        names = list(self.urls)
        texts = await asyncio.gather(*(self._get(self.urls[n]) for n in names))
        for name, text in zip(names, texts, strict=True):
            if text is None:
                continue
            gauges = read_gauges(text)
            peak = self.peaks[name]
            peak.waiting = max(peak.waiting, gauges.get(WAITING, 0.0))
            peak.running = max(peak.running, gauges.get(RUNNING, 0.0))
            peak.kv_usage = max(peak.kv_usage, gauges.get(KV_USAGE, 0.0))
            peak.samples += 1

    async def _get(self, url: str) -> str | None:
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status != 200:
                    return None
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.sample()
            next_at += self.interval_s
            await asyncio.sleep(max(next_at - loop.time(), 0.0))

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def __aenter__(self) -> LoadSampler:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
