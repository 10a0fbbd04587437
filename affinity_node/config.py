"""Node configuration: one YAML file for all nodes, environment variables on top.

Every scalar key can be overridden by `AFFINITY_<SECTION>_<KEY>` (for example
`AFFINITY_LISTEN_PORT=9000`, `AFFINITY_AFFINITY_TTL_SECONDS=600`); top-level keys by
`AFFINITY_<KEY>` (`AFFINITY_NODE_ID`). The DSN is `AFFINITY_DATABASE_DSN`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from affinity_node.vocabulary import BackendKind, StoreKind, StrategyName


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


@dataclass
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    ops_port: int | None = None
    """When set, /metrics, /healthz and /readyz are served on this port instead."""
    debug_endpoints: bool = False
    """GET /debug/bindings: this node's cached bindings, pairs hashed (for the chaos soak)."""


@dataclass
class DatabaseConfig:
    dsn: str = ""
    pool_max: int = 10
    statement_timeout_ms: int = 2000
    lock_timeout_ms: int = 1000
    """Longest wait for a pair's advisory lock: a busy lock is not an outage."""
    startup_wait_seconds: float = 5.0
    """How long a starting node waits for its first snapshot before serving (degraded)."""


@dataclass
class AffinityConfig:
    enabled: bool = True
    store: StoreKind = "postgres"
    ttl_seconds: float = 1800.0
    load_factor: float = 1.25
    spill_min_gap: int = 8
    refresh_flush_interval_seconds: float = 1.0
    cache_max_entries: int = 100_000
    max_fanout: int = 4
    """Largest backend set one pair may grow into (1: one backend per pair, no fan-out)."""
    fanout_queue_bound: int = 4
    """A member with this many requests waiting (vLLM's own queue) is hot."""
    fanout_hot_factor: float = 1.5
    """... so is one whose load is this many times the fleet's mean (and 4 above it)."""
    fanout_grow_after_seconds: float = 2.0
    """Every member hot this long: one more member."""
    fanout_shrink_after_seconds: float = 120.0
    """Every member cool this long: the newest member goes."""


@dataclass
class LoadConfig:
    poll_interval_seconds: float = 1.0
    """How often each backend's /metrics is read for its running and waiting requests."""


@dataclass
class RoutingConfig:
    fallback: StrategyName = "least_outstanding"


@dataclass
class HealthConfig:
    interval_seconds: float = 5.0
    eject_after_failures: int = 3
    readmit_after_successes: int = 2


@dataclass
class LimitsConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    upstream_connect_timeout_seconds: float = 5.0
    upstream_read_timeout_seconds: float = 600.0
    """Longest silence between two chunks of a streamed answer."""
    generation_timeout_seconds: float = 300.0
    """Longest non-streamed generation (vLLM sends nothing until it is done)."""
    client_write_timeout_seconds: float = 30.0
    """A client that reads nothing of a stream for this long is dropped (its slot frees)."""
    client_idle_timeout_seconds: float = 15.0
    """An idle client connection, or one that sent only part of its headers, closes."""
    drain_timeout_seconds: float = 30.0


@dataclass
class LoggingConfig:
    level: str = "INFO"
    json: bool = False
    access: bool = False
    """One JSON access-log line per request."""


@dataclass
class BackendConfig:
    url: str
    models: list[str] = field(default_factory=list)
    kind: BackendKind = "vllm"


@dataclass
class ModelConfig:
    name: str
    aliases: list[str] = field(default_factory=list)
    affinity: bool = True


@dataclass
class NodeConfig:
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    listen: ListenConfig = field(default_factory=ListenConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    backends: list[BackendConfig] = field(default_factory=list)
    models: list[ModelConfig] = field(default_factory=list)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, UnionType):  # `X | None`: null (or an empty env var) means unset
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return None if value is None or value == "" else _coerce(value, inner, where)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "1",
            "yes",
            "on",
            "false",
            "0",
            "no",
            "off",
        ):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _apply_env(cfg: NodeConfig, env: Mapping[str, str]) -> None:
    hints = get_type_hints(NodeConfig)
    for f in dataclasses.fields(NodeConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = getattr(cfg, f.name)
            sub_hints = get_type_hints(type(section))
            for sf in dataclasses.fields(section):
                var = f"AFFINITY_{f.name}_{sf.name}".upper()
                if var in env:
                    setattr(section, sf.name, _coerce(env[var], sub_hints[sf.name], var))
        elif hint is str:
            var = f"AFFINITY_{f.name}".upper()
            if var in env:
                setattr(cfg, f.name, env[var])


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> NodeConfig:
    data: Any = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    cfg: NodeConfig = _build(NodeConfig, data, "")
    _apply_env(cfg, os.environ if env is None else env)
    validate(cfg)
    return cfg


def validate(cfg: NodeConfig) -> None:
    if cfg.affinity.ttl_seconds <= 0:
        raise ConfigError("affinity.ttl_seconds must be positive")
    if cfg.affinity.load_factor < 1:
        raise ConfigError("affinity.load_factor must be at least 1")
    if cfg.database.lock_timeout_ms >= cfg.database.statement_timeout_ms:
        raise ConfigError(
            "database.lock_timeout_ms must be below database.statement_timeout_ms "
            "(a busy lock must end as a lock timeout, not be taken for a database outage)"
        )
    if cfg.limits.max_body_bytes < 1024:
        raise ConfigError("limits.max_body_bytes must be at least 1024")
    if not cfg.backends:
        raise ConfigError("backends: at least one backend is needed")
    if not cfg.database.dsn:
        raise ConfigError(
            "database.dsn is empty: set it in the config or in AFFINITY_DATABASE_DSN "
            "(API keys live in Postgres even with affinity.store: memory)"
        )
