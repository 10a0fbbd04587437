"""What the handlers share, behind typed application keys."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from affinity_node.auth.keycache import KeyCache
from affinity_node.config import NodeConfig
from affinity_node.observability.metrics import AffinityMetrics, HttpMetrics
from affinity_node.routing.engine import AffinityEngine
from affinity_node.routing.pool import BackendPool
from affinity_node.routing.router import Router


@dataclass
class NodeState:
    config: NodeConfig
    pool: BackendPool
    http_metrics: HttpMetrics
    affinity_metrics: AffinityMetrics
    router: Router | None = None
    engine: AffinityEngine | None = None
    keys: KeyCache | None = None
    session: aiohttp.ClientSession | None = None
    draining: bool = False
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    """Set whenever no completion request is in progress (drain waits on it)."""


NODE: web.AppKey[NodeState] = web.AppKey("node", NodeState)
