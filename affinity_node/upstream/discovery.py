"""Backends found by DNS: a `backends` entry that names a DNS name (a Kubernetes headless
Service) and a port instead of a URL. Every interval the name is resolved again; a new address
joins as a backend, an address that is gone drains (no new bindings, its bindings are moved
off by the fleet's mover, in-flight requests finish) and leaves once idle. Every node resolves
the same name, so nodes agree without talking. A failed resolution changes nothing. An
address outside `backends.allow` is refused (warned once): a DNS answer cannot add a backend
the operator did not allow.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from affinity_node.config import HostAllowList
from affinity_node.observability.logs import RateLimitedLog
from affinity_node.routing.backends import Backend, BackendPool, BackendSpec, normalise_url
from affinity_node.tasks import Periodic, every
from affinity_node.vocabulary import BackendKind

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""(name, port) -> the addresses it resolves to now (raises OSError when it cannot say)."""


async def system_resolver(name: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True, slots=True)
class DnsEntry:
    name: str
    port: int
    scheme: str = "http"
    kind: BackendKind = "vllm"
    models: tuple[str, ...] = ()


def _url(entry: DnsEntry, address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return normalise_url(f"{entry.scheme}://{host}:{entry.port}")


class DnsDiscovery:
    def __init__(
        self,
        backends: BackendPool,
        entries: Sequence[DnsEntry],
        resolver: Resolver = system_resolver,
        is_idle: Callable[[Backend], bool] = lambda b: b.inflight == 0,
        allow: HostAllowList | None = None,
    ) -> None:
        self._backends = backends
        self._entries = tuple(entries)
        self._resolver = resolver
        self._is_idle = is_idle
        """Whether a backend that left DNS may leave the pool."""
        self._mine: dict[DnsEntry, set[str]] = {e: set() for e in self._entries}
        self._warn = RateLimitedLog(log)
        self._allow = allow or HostAllowList()
        self.refused: set[str] = set()
        """Addresses found by DNS and refused (not in backends.allow)."""

    @property
    def active(self) -> bool:
        return bool(self._entries)

    async def resolve_once(self) -> None:
        for entry in self._entries:
            try:
                addresses = await self._resolver(entry.name, entry.port)
            except OSError as exc:
                self._warn.warning(entry.name, "cannot resolve %s: %r", entry.name, exc)
                continue
            wanted = {u for u in (_url(entry, a) for a in addresses) if self._allowed(u, entry)}
            known = self._mine[entry]
            for url in sorted(wanted - known):
                backend = self._backends.add(BackendSpec(url, entry.kind, entry.models), "dns")
                self._backends.set_state(backend, "active")
                log.info("backend %s joined (%s)", url, entry.name)
            for url in sorted(wanted & known):
                back = self._backends.get(url)
                if back is not None and back.state == "draining":
                    self._backends.set_state(back, "active")  # it came back
            for url in sorted(known - wanted):
                gone = self._backends.get(url)
                if gone is None:
                    continue
                if self._backends.set_state(gone, "draining"):
                    log.info("backend %s left %s: draining", url, entry.name)
                if self._is_idle(gone):
                    self._backends.remove(url)
                    log.info("backend %s removed (drained)", url)
            self._mine[entry] = wanted | {
                url for url in known - wanted if self._backends.get(url) is not None
            }

    def _allowed(self, url: str, entry: DnsEntry) -> bool:
        if self._allow.allows_url(url):
            return True
        if url not in self.refused:
            self.refused.add(url)
            log.warning("backend %s (%s) refused: not in backends.allow", url, entry.name)
        return False

    def start(self, interval_s: float) -> Periodic:
        """Resolve again every interval (the first resolution is the caller's, at startup)."""
        return every(interval_s, self.resolve_once, "dns-discovery")
