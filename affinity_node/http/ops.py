"""Probes, metrics and the model list."""

from __future__ import annotations

import hashlib
import json
import time
from uuid import UUID

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from affinity_node.http.state import BACKENDS, CONFIG, ENGINE, KEYS, REGISTRY, STATUS


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never checks Postgres."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """503 only when this node cannot serve: draining, or no healthy backend.

    A lost database keeps the node ready (affinity degrades, requests are still served), so an
    outage does not pull every node out of the load balancer at once.
    """
    app = request.app
    pool = app[BACKENDS]
    registry = app[REGISTRY]
    healthy = sum(1 for b in pool.backends if b.healthy)
    db_up = registry.get_sample_value("affinity_db_up") == 1
    listener_up = registry.get_sample_value("affinity_listener_up") == 1
    # Until the first key snapshot, every request would be answered 503 ("cannot verify the
    # key"): not ready. Once loaded, a later database loss keeps the node ready.
    if app[STATUS].draining:
        status = "draining"
    elif not pool.has_healthy():
        status = "no_healthy_backend"
    elif not app[KEYS].loaded:
        status = "keys_not_loaded"
    else:
        status = "ready"
    body = {
        "status": status,
        "node_id": app[CONFIG].node_id,
        "database": "up" if db_up else "down",
        "listener": "up" if listener_up else "down",
        "healthy_backends": healthy,
        "backends": len(pool.backends),
    }
    return web.json_response(body, status=200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(request.app[REGISTRY]), headers={"Content-Type": content_type})


async def models(request: web.Request) -> web.Response:
    """GET /v1/models (the middleware checked the key)."""
    app = request.app
    created = int(time.time())
    aliases: dict[str, list[str]] = {m.name: list(m.aliases) for m in app[CONFIG].models}
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "affinity-node",
            "aliases": aliases.get(name, []),
        }
        for name in app[BACKENDS].served_models()
    ]
    return web.Response(
        body=json.dumps({"object": "list", "data": data}).encode(),
        content_type="application/json",
    )


def pair_fingerprint(api_key_id: UUID, model: str) -> str:
    """A pair as debug output names it: comparable across nodes, no key id in the clear."""
    return hashlib.sha256(api_key_id.bytes + model.encode()).hexdigest()[:16]


async def debug_bindings(request: web.Request) -> web.Response:
    """The live bindings this node would use now (for comparing nodes with the table)."""
    engine = request.app[ENGINE]
    now = time.monotonic()
    bindings = {
        pair_fingerprint(*pair): entry.backend
        for pair, entry in engine.cache.items()
        if entry.deadline > now
    }
    return web.json_response({"node_id": request.app[CONFIG].node_id, "bindings": bindings})
