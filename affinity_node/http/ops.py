"""Probes, metrics and the model list.

The probes and /metrics read the node's state through `request.app[NODE]`, so they answer the
same on the API port and on the operations port (`listen.ops_port`), which is a second
application holding a reference to the node's.
"""

from __future__ import annotations

import hashlib
import json
import time
from uuid import UUID

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from affinity_node.http.state import BACKENDS, CONFIG, ENGINE, KEYS, METRICS_REGISTRY, NODE, STATUS


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never checks Postgres or backends, and stays 200
    while the node drains (a liveness failure then would kill open streams)."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """503 only when this node cannot take traffic: draining, the database lacks a migration
    this code needs (`schema_behind`), or its key set not loaded yet.

    The bindings snapshot does not gate readiness either: the node serves while it loads (pairs
    not loaded yet are read like misses) and `snapshot` in the body says how far it came.
    A lost database keeps the node ready (affinity degrades, requests are still served), and so
    does a fleet with no healthy backend: the node answers those requests itself (503 with an
    OpenAI error body and Retry-After) and the metric affinity_model_healthy_backends alerts.
    Failing readiness for it would pull every node out of the load balancer at once, and
    clients would get the balancer's bare 503 instead.
    """
    app = request.app[NODE]
    backends = app[BACKENDS]
    engine = app[ENGINE]
    metrics_registry = app[METRICS_REGISTRY]
    healthy = sum(1 for b in backends.backends if b.healthy)
    db_up = metrics_registry.get_sample_value("affinity_db_up") == 1
    listener_up = metrics_registry.get_sample_value("affinity_listener_up") == 1
    # Until the first key snapshot, every request would be answered 503 ("cannot verify the
    # key"): not ready. Once loaded, a later database loss keeps the node ready.
    # A node that never reached the database says so first (it cannot know the schema yet).
    if app[STATUS].draining:
        status = "draining"
    elif not app[KEYS].loaded:
        status = "keys_not_loaded"
    elif app[STATUS].schema_behind:
        status = "schema_behind"
    else:
        status = "ready"
    models = {m.name for m in app[CONFIG].models} | {m for b in backends.backends for m in b.models}
    body = {
        "status": status,
        "node_id": app[CONFIG].node_id,
        "database": "up" if db_up else "down",
        "listener": "up" if listener_up else "down",
        "healthy_backends": healthy,
        "backends": len(backends.backends),
        "models_without_healthy_backend": sorted(m for m in models if not backends.candidates(m)),
        "keys": len(app[KEYS]),
        "key_resyncs": app[KEYS].resyncs,
        "snapshot": {**engine.sync_status.as_dict(), "watermark": engine.watermark},
    }
    return web.json_response(body, status=200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    metrics_registry = request.app[NODE][METRICS_REGISTRY]
    return web.Response(body=encoder(metrics_registry), headers={"Content-Type": content_type})


async def models(request: web.Request) -> web.Response:
    """GET /v1/models (the middleware checked the key)."""
    app = request.app
    created = int(time.time())
    aliases: dict[str, list[str]] = {m.name: list(m.aliases) for m in app[CONFIG].models}
    backends = app[BACKENDS]
    data = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "affinity-node",
            "aliases": aliases.get(name, []),
            "parent": backends.parent_of(name),  # a LoRA adapter's base model, as vLLM lists it
        }
        for name in backends.served_models()
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
    node = request.app[NODE]
    engine = node[ENGINE]
    now = time.monotonic()
    bindings = {
        pair_fingerprint(*pair): entry.backend
        for pair, entry in engine.cache.items()
        if entry.deadline > now
    }
    return web.json_response({"node_id": node[CONFIG].node_id, "bindings": bindings})
