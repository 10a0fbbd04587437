"""The upstream layer's port: what its health checker needs from the HTTP client
(client.UpstreamClient provides it). What the HTTP surface needs from the client is
transport.py."""

from __future__ import annotations

from typing import Protocol

from affinity_node.routing.backends import ListedModel


class Prober(Protocol):
    """What the checker needs from the HTTP client (UpstreamClient provides it)."""

    async def health(self, base_url: str) -> str | None: ...

    async def models(self, base_url: str) -> list[ListedModel]: ...
