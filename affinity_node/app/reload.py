"""SIGHUP: the config file read again and its safe subset applied without a rollout.

All or nothing: a file that does not load (bad YAML, a key out of range) or that changes a key
outside `config.RELOADABLE` is refused as a whole (logged; the running config stays), so the
config in effect is always one that loaded, and `affinity_config_info{hash}` names it. The
subset is applied in place, in one turn of the event loop: the limits object every request reads
is updated, the access log switched, the config's backends joined or left through the backend
pool as the registry's are.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from aiohttp import web

from affinity_node.config import (
    ConfigError,
    NodeConfig,
    config_hash,
    config_summary,
    load_config,
    unreloadable_changes,
)
from affinity_node.http.state import ACCESS_LOG, BACKENDS, CONFIG, HTTP_METRICS, UPSTREAM
from affinity_node.observability.logs import AccessLog, configure_logging
from affinity_node.routing.backends import BackendSpec
from affinity_node.routing.lifecycle import apply_static

log = logging.getLogger(__name__)


def reload_config(app: web.Application, path: str | Path | None) -> bool:
    """Re-read `path` (and the environment); apply it when it loads and changes only what a
    running node can change. True when applied."""
    running = app[CONFIG]
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("config reload refused: %s; the running config stays", exc)
        return False
    refused = unreloadable_changes(running, new)
    if refused:
        log.error(
            "config reload refused: %s cannot change without a restart; the running config stays",
            ", ".join(refused),
        )
        return False
    _apply(app, running, new)
    digest = config_hash(running)
    app[HTTP_METRICS].show_config(digest)
    log.info("config reloaded (hash %s)", digest)
    log.debug("config in effect: %s", config_summary(running))
    return True


def _apply(app: web.Application, running: NodeConfig, new: NodeConfig) -> None:
    if new.logging != running.logging:
        configure_logging(new.logging.level, new.logging.json, access=new.logging.access)
        access = app[ACCESS_LOG]
        if isinstance(access, AccessLog):
            access.enabled = new.logging.access
        running.logging = new.logging
    # In place: the relay and the body reader hold this very object and read it per request.
    for f in dataclasses.fields(running.limits):
        setattr(running.limits, f.name, getattr(new.limits, f.name))
    client = app[UPSTREAM]
    client.timeouts = dataclasses.replace(
        client.timeouts,
        read_s=new.limits.upstream_read_timeout_seconds,
        generation_s=new.limits.generation_timeout_seconds,
    )
    specs = [BackendSpec(b.url, b.kind, tuple(b.models)) for b in new.backends if b.url]
    for change in apply_static(app[BACKENDS], specs):
        log.info("config backends: %s", change)
    running.backends = new.backends
