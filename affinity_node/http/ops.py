"""Probes, metrics and the model list."""

from __future__ import annotations

import json
import time

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from affinity_node.http.proxy import authenticate
from affinity_node.http.state import NODE

REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never checks Postgres."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """503 only when this node cannot serve: draining, or no healthy backend.

    A lost database keeps the node ready (affinity degrades, requests are still served), so an
    outage does not pull every node out of the load balancer at once.
    """
    node = request.app[NODE]
    healthy = sum(1 for b in node.pool.backends if b.healthy)
    db_up = node.affinity_metrics.registry.get_sample_value("affinity_db_up") == 1
    ready = not node.draining and node.pool.has_healthy()
    body = {
        "status": "ready" if ready else ("draining" if node.draining else "no_healthy_backend"),
        "node_id": node.config.node_id,
        "database": "up" if db_up else "down",
        "listener": "up" if node.listener_up else "down",
        "healthy_backends": healthy,
        "backends": len(node.pool.backends),
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(
        body=encoder(request.app[REGISTRY]), headers={"Content-Type": content_type}
    )


async def models(request: web.Request) -> web.Response:
    node = request.app[NODE]
    await authenticate(node, request)
    created = int(time.time())
    aliases: dict[str, list[str]] = {m.name: list(m.aliases) for m in node.config.models}
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "affinity-node",
         "aliases": aliases.get(name, [])}
        for name in node.pool.served_models()
    ]
    return web.Response(
        body=json.dumps({"object": "list", "data": data}).encode(),
        content_type="application/json",
    )
