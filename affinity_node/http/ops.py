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
    registry = node.affinity_metrics.registry
    db_up = registry.get_sample_value("affinity_db_up") == 1
    listener_up = registry.get_sample_value("affinity_listener_up") == 1
    # Until the first key snapshot, every request would be answered 503 ("cannot verify the
    # key"): not ready. Once loaded, a later database loss keeps the node ready.
    keys_loaded = node.keys is not None and node.keys.loaded
    if node.draining:
        status = "draining"
    elif not node.pool.has_healthy():
        status = "no_healthy_backend"
    elif not keys_loaded:
        status = "keys_not_loaded"
    else:
        status = "ready"
    ready = status == "ready"
    body = {
        "status": status,
        "node_id": node.config.node_id,
        "database": "up" if db_up else "down",
        "listener": "up" if listener_up else "down",
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
