"""Node configuration: one YAML file for all nodes, environment variables on top.

Every scalar key can be overridden by `AFFINITY_<SECTION>_<KEY>` (for example
`AFFINITY_LISTEN_PORT=9000`, `AFFINITY_AFFINITY_TTL_SECONDS=600`); top-level keys by
`AFFINITY_<KEY>` (`AFFINITY_NODE_ID`). The DSN is `AFFINITY_DATABASE_DSN`, or the content of
the file `AFFINITY_DATABASE_DSN_FILE` names (read again at every new connection, so a rotated
password needs no restart).

`backends` is either the list of backends or a mapping `{allow: [...], list: [...]}`; the
allow-list (`backends.allow`) is also `AFFINITY_BACKENDS_ALLOW` (comma-separated).

Every numeric key declares its range beside its default (`_range`); `validate` checks them all
and the cross-key rules, and every error is one line that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import ipaddress
import json
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import UnionType
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

import yaml

from affinity_node.vocabulary import BackendKind, StoreKind, StrategyName


class ConfigError(ValueError):
    """The configuration cannot be used; the message (one line) names the key."""


DAY: Final = 86_400.0
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NODE_ID_PATTERN: Final = re.compile(r"[\x21-\x7e]{1,128}")
"""node_id goes into a response header (x-affinity-node) and metric-free log lines: printable
ASCII without spaces, at most 128 characters."""


def _range(
    default: Any, low: float | None = None, high: float | None = None, *, above: bool = False
) -> Any:
    """A numeric field with its allowed range: `low <= value <= high` (`low < value` when
    `above`); `validate` checks it."""
    return field(default=default, metadata={"low": low, "high": high, "above": above})


@dataclass
class ListenConfig:
    host: str = "0.0.0.0"
    port: int = _range(8080, 0, 65535)
    """0 picks a free port (tests)."""
    ops_port: int | None = _range(None, 0, 65535)
    """When set, /metrics, /healthz and /readyz are served on this port instead of `port`,
    which then serves the API only."""
    trusted_proxies: list[str] = field(default_factory=list)
    """Addresses or CIDRs of load balancers whose X-Forwarded-For the access log believes
    (`AFFINITY_LISTEN_TRUSTED_PROXIES`, comma-separated); empty: the peer is the client."""
    debug_endpoints: bool = False
    """GET /debug/bindings: this node's cached bindings, pairs hashed (for the chaos soak);
    on the ops port when `ops_port` is set."""


@dataclass
class DatabaseConfig:
    dsn: str = ""
    """The pool's DSN; several hosts (`postgresql://u@h1:5432,h2:5432/db`) with
    `target_session_attrs=read-write` follow a failover to whichever host is the primary."""
    dsn_file: str = ""
    """Instead of `dsn`: a file holding it (a mounted Secret), read at start and again whenever
    a connection is made (the pool's and the listener's), so a rotated password is picked up
    by the next connection."""
    listen_dsn: str = ""
    """The LISTEN connection's DSN (empty: `dsn`). Always direct to Postgres: a transaction
    pooler (PgBouncer) cannot keep a LISTEN session."""
    statement_cache: bool = True
    """asyncpg's prepared-statement cache. Off behind a transaction-mode pooler (PgBouncer), where
    a statement prepared in one transaction is gone in the next; the pool then also sends no
    session settings at connect (set the timeouts on the role: deploy/README.md)."""
    pool_max: int = _range(10, 1, 1000)
    statement_timeout_ms: int = _range(2000, 1, 3_600_000)
    lock_timeout_ms: int = _range(1000, 1, 3_600_000)
    """Longest wait for a pair's advisory lock: a busy lock is not an outage."""
    startup_wait_seconds: float = _range(5.0, 0, 3600)
    """How long a starting node waits for its first snapshot before serving (degraded)."""

    @property
    def dsn_source(self) -> DsnSource:
        """The pool's DSN, or what reads it from `dsn_file` at each connection."""
        return partial(read_dsn_file, self.dsn_file) if self.dsn_file else self.dsn

    @property
    def listener_dsn(self) -> DsnSource:
        return self.listen_dsn or self.dsn_source

    def startup_dsn(self) -> str:
        """The DSN as it is now (`dsn_file` read once): for checks and advice."""
        return read_dsn_file(self.dsn_file) if self.dsn_file else self.dsn


DsnSource = str | Callable[[], str]
"""A DSN, or a function giving the current one (called at every new connection)."""


def read_dsn_file(path: str) -> str:
    """The DSN in `path` (surrounding whitespace dropped). Raises OSError, never with the
    file's content in the message: it holds a password."""
    try:
        dsn = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise OSError(f"database.dsn_file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise OSError(f"database.dsn_file {path}: not UTF-8 text") from None
    if not dsn:
        raise OSError(f"database.dsn_file {path}: empty")
    return dsn


@dataclass
class AffinityConfig:
    enabled: bool = True
    store: StoreKind = "postgres"
    ttl_seconds: float = _range(1800.0, 0, 30 * DAY, above=True)
    load_factor: float = _range(1.25, 1, 1000)
    spill_min_gap: int = _range(8, 0, 1_000_000)
    refresh_flush_interval_seconds: float = _range(1.0, 0, 3600, above=True)
    cache_max_entries: int = _range(0, 0, 1_000_000_000)
    """0: the cache follows the table (every live binding, ~70 bytes each); a bound evicts
    the entries closest to expiry (affinity_cache_evictions_total{reason="size"})."""
    max_fanout: int = _range(4, 1, 16)
    """Largest backend set one pair may grow into (1: one backend per pair, no fan-out)."""
    fanout_queue_bound: int = _range(4, 1, 100_000)
    """A member with this many requests waiting (vLLM's own queue) is hot."""
    fanout_hot_factor: float = _range(1.5, 1, 1000)
    """... so is one whose load is this many times the fleet's mean (and 4 above it)."""
    fanout_grow_after_seconds: float = _range(2.0, 0, 3600)
    """A member hot and none cool this long: one more member."""
    fanout_shrink_after_seconds: float = _range(120.0, 0, 7 * DAY)
    """Every member cool this long: the newest member goes."""


@dataclass
class LoadConfig:
    poll_interval_seconds: float = _range(1.0, 0, 3600, above=True)
    """How often each backend's /metrics is read for its running and waiting requests."""


@dataclass
class DrainConfig:
    moves_per_second: float = _range(2.0, 0, 1000, above=True)
    """Bindings moved off draining backends, fleet-wide (faster when a deadline needs it)."""


@dataclass
class RebalanceConfig:
    enabled: bool = True
    max_moves_per_minute: float = _range(30.0, 0, 60_000, above=True)
    """Fleet-wide pace of rebalancing moves."""
    skew: float = _range(1.25, 1, 100)
    """Load over the mean (busiest) or the mean over load (idlest) that starts a rebalance
    (binding counts when the fleet is idle); it then goes on until half this excess is left."""
    after_seconds: float = _range(10.0, 0, 86_400)
    """How long the skew must last before bindings move."""


@dataclass
class DiscoveryConfig:
    interval_seconds: float = _range(10.0, 0, 86_400, above=True)
    """How often `backends` entries given by DNS name are resolved again, and every vllm
    backend's GET /v1/models is asked again (LoRA adapters loaded or unloaded at runtime)."""


@dataclass
class LedgerConfig:
    """The per-tenant usage ledger (table usage_ledger, command `usage`)."""

    enabled: bool = True
    flush_interval_seconds: float = _range(5.0, 0, 3600, above=True)
    """Counts wait in memory this long, then one statement adds them (a node that dies loses
    at most this much)."""
    retention_days: float = _range(90.0, 0, 3650, above=True)
    """Rows older than this are deleted (by one node at a time)."""
    max_pending_rows: int = _range(100_000, 1, 10_000_000)
    """Rows (key, model, backend, hour) kept in memory while the database is away; requests
    needing more are counted as dropped."""


@dataclass
class RoutingConfig:
    fallback: StrategyName = "least_outstanding"


@dataclass
class HealthConfig:
    interval_seconds: float = _range(5.0, 0, 3600, above=True)
    eject_after_failures: int = _range(3, 1, 1000)
    readmit_after_successes: int = _range(2, 1, 1000)


@dataclass
class LimitsConfig:
    """Timeouts, with the relation the deploy files keep (deploy/README.md, "Timeouts and
    drain"): upstream_read_timeout <= generation_timeout <= drain_timeout; the platform's
    grace period >= preStop + drain_timeout + 10 s; the load balancer's server timeout >=
    generation_timeout."""

    max_body_bytes: int = _range(8 * 1024 * 1024, 1024, 1024**3)
    upstream_connect_timeout_seconds: float = _range(5.0, 0, 600, above=True)
    upstream_read_timeout_seconds: float = _range(300.0, 0, DAY, above=True)
    """Longest silence between two chunks of a streamed answer (the first one included)."""
    generation_timeout_seconds: float = _range(300.0, 0, DAY, above=True)
    """Longest non-streamed generation (vLLM sends nothing until it is done)."""
    client_write_timeout_seconds: float = _range(30.0, 0, 3600, above=True)
    """A client that reads nothing of an answer for this long (streams: checked every quarter
    of it) is dropped (its slot frees)."""
    client_idle_timeout_seconds: float = _range(15.0, 0, 3600, above=True)
    """An idle client connection, or one that sent only part of its headers, closes."""
    client_body_read_timeout_seconds: float = _range(30.0, 0, 3600, above=True)
    """Longest wait for the next bytes of a request body: a client that stalls its body gets
    408 and never reaches a backend."""
    drain_timeout_seconds: float = _range(330.0, 0, DAY)
    """After SIGTERM: how long open requests may run on. Not shorter than
    generation_timeout_seconds, so a rollout lets a generation that just started finish."""


@dataclass
class FairnessConfig:
    """Fair queueing under saturation (routing/fairq.py): while a model's backends are nearly
    full, new requests wait in the node by fairness instead of in a vLLM FIFO queue. Off by
    default until the noisy demo meets its latency target (small tenants' p99)."""

    enabled: bool = False
    max_queue: int = _range(1000, 1, 1_000_000)
    """Requests one model's queue holds on this node; past it the heaviest tenant's last
    queued request is refused (429)."""
    max_wait_seconds: float = _range(30.0, 0, 3600, above=True)
    """Longest wait in the queue: then 429 (a tenant holding more than its share of the
    queue) or 503 (the fleet is out of room), both with Retry-After."""
    half_life_seconds: float = _range(10.0, 0, 86_400, above=True)
    """A tenant's recent service (tokens) halves in this long."""
    reserve_slots: int = _range(1, 0, 100_000)
    """Slots of a nearly full model kept for tenants at or under their fair share: their
    requests start at once instead of after the next completion. A flood waits while these
    idle; 0 is strictly work-conserving."""


@dataclass
class LoggingConfig:
    level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."""
    json: bool = False
    access: bool = False
    """One JSON access-log line per API request (probes and scrapes are not logged)."""
    key_ref: Literal["hmac", "name"] = "hmac"
    """How the access log names the tenant: `hmac` (of the key id with `key_ref_secret`: stable
    across nodes and restarts, not reversible) or `name` (the key's public name, opt-in)."""
    key_ref_secret: str = ""
    """The HMAC secret (`AFFINITY_LOGGING_KEY_REF_SECRET`); empty: no key_ref in the log."""


@dataclass
class TracingConfig:
    otlp_endpoint: str = ""
    """OTLP/HTTP collector (`http://collector:4318`, or its full `/v1/traces` URL): spans per
    request, with the `otel` extra installed. Empty: no spans (traceparent is passed anyway)."""
    sample_ratio: float = _range(1.0, 0.0, 1.0)
    """Share of new traces recorded; a client's sampled traceparent is always followed."""
    flush_interval_seconds: float = _range(2.0, 0.01, 60.0)
    """How often finished spans are sent in one batch."""


@dataclass
class BackendConfig:
    url: str = ""
    """One backend; or, instead:"""
    dns: str = ""
    """A DNS name (a Kubernetes headless Service) whose addresses are the backends, resolved
    again every `discovery.interval_seconds`; with `port` (and `scheme`)."""
    port: int = _range(0, 0, 65535)
    scheme: Literal["http", "https"] = "http"
    models: list[str] = field(default_factory=list)
    kind: BackendKind = "vllm"


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST_PATTERN: Final = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class HostAllowList:
    """`backends.allow`: the hosts a backend may have. Empty allows every host (as before the
    key existed). Entries are IP networks (`10.0.0.0/8`, `fd00::/8`), addresses, host names
    (exact, any case) and `*.domain` (any name under it). Names are never resolved: a backend
    given by address needs a network, one given by name needs the name, so a DNS answer
    cannot widen the list."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str], where: str = "backends.allow") -> HostAllowList:
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IpNetwork] = []
        for i, raw in enumerate(entries):
            entry = raw.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or not _HOST_PATTERN.fullmatch(entry):
                raise ConfigError(f"{where}[{i}]: {raw!r} is not a host name, address or CIDR")
            if entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                names.add(entry)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def allows_host(self, host: str) -> bool:
        if self.empty:
            return True
        host = host.strip("[]").lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return host in self.names or host.endswith(self.suffixes)
        mapped = getattr(address, "ipv4_mapped", None)
        return any(address in net or (mapped is not None and mapped in net)
                   for net in self.networks)  # fmt: skip

    def allows_url(self, url: str) -> bool:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return False
        return host is not None and self.allows_host(host)


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
    drain: DrainConfig = field(default_factory=DrainConfig)
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    backends: list[BackendConfig] = field(default_factory=list)
    models: list[ModelConfig] = field(default_factory=list)
    backends_allow: list[str] = field(default_factory=list, init=False)
    """`backends.allow` in YAML (the mapping form of `backends`), AFFINITY_BACKENDS_ALLOW."""

    @property
    def allow(self) -> HostAllowList:
        return HostAllowList.parse(self.backends_allow)


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
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _split_backends(data: Any) -> tuple[Any, list[str]]:
    """`backends: [...]` (the list) or `backends: {allow: [...], list: [...]}`."""
    if not isinstance(data, Mapping) or not isinstance(data.get("backends"), Mapping):
        return data, []
    section = data["backends"]
    unknown = set(section) - {"allow", "list"}
    if unknown:
        raise ConfigError(f"backends: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    allow = section.get("allow") or []
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ConfigError("backends.allow: expected a list of host names, addresses or CIDRs")
    return {**data, "backends": section.get("list") or []}, allow


def _apply_env(cfg: NodeConfig, env: Mapping[str, str]) -> None:
    if "AFFINITY_BACKENDS_ALLOW" in env:
        cfg.backends_allow = env_allow_list(env)
    hints = get_type_hints(NodeConfig)
    for f in dataclasses.fields(NodeConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = getattr(cfg, f.name)
            sub_hints = get_type_hints(type(section))
            for sf in dataclasses.fields(section):
                var = f"AFFINITY_{f.name}_{sf.name}".upper()
                if var in env:
                    raw: Any = env[var]
                    if get_origin(sub_hints[sf.name]) is list:  # comma-separated
                        raw = [e for e in re.split(r"[,\s]+", raw) if e]
                    setattr(section, sf.name, _coerce(raw, sub_hints[sf.name], var))
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
            raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(exc)}") from None
    data, allow = _split_backends(data)
    cfg: NodeConfig = _build(NodeConfig, data, "")
    cfg.backends_allow = allow
    _apply_env(cfg, os.environ if env is None else env)
    validate(cfg)
    return cfg


def env_allow_list(env: Mapping[str, str]) -> list[str]:
    """AFFINITY_BACKENDS_ALLOW: entries separated by commas or spaces (empty: allow all)."""
    return [e for e in re.split(r"[,\s]+", env.get("AFFINITY_BACKENDS_ALLOW", "")) if e]


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message spans several lines; this is one: the problem and where."""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _check_ranges(section: Any, where: str) -> None:
    for f in dataclasses.fields(section):
        if "low" not in f.metadata:
            continue
        value = getattr(section, f.name)
        if value is None:
            continue
        key = f"{where}.{f.name}" if where else f.name
        low, high, above = f.metadata["low"], f.metadata["high"], f.metadata["above"]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        if low is not None and (value <= low if above else value < low):
            bound = f"greater than {low:g}" if above else f"at least {low:g}"
            raise ConfigError(f"{key}: must be {bound}, got {value!r}")
        if high is not None and value > high:
            raise ConfigError(f"{key}: must be at most {high:g}, got {value!r}")


def _check_url(url: str, where: str, path_ok: bool = False) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number or out of range)
    except ValueError as exc:
        raise ConfigError(f"{where}: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} must be an http:// or https:// URL with a host")
    if path_ok:
        return
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{where}: {url!r} must be the server's base URL (no path: the node appends /v1/...)"
        )


def validate(cfg: NodeConfig) -> None:
    """Every key's range and the rules between keys; the first problem raises ConfigError."""
    if not NODE_ID_PATTERN.fullmatch(cfg.node_id):
        raise ConfigError(
            f"node_id: {cfg.node_id!r} must be 1 to 128 printable ASCII characters, no spaces"
        )
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            _check_ranges(section, f.name)
    if not cfg.listen.host.strip():
        raise ConfigError("listen.host: must not be empty")
    ops = cfg.listen.ops_port
    if ops is not None and ops != 0 and ops == cfg.listen.port:
        raise ConfigError(f"listen.ops_port: must differ from listen.port ({ops})")
    if cfg.database.lock_timeout_ms >= cfg.database.statement_timeout_ms:
        raise ConfigError(
            "database.lock_timeout_ms must be below database.statement_timeout_ms "
            "(a busy lock must end as a lock timeout, not be taken for a database outage)"
        )
    for i, entry in enumerate(cfg.listen.trusted_proxies):
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(
                f"listen.trusted_proxies[{i}]: {entry!r} is not an address or CIDR"
            ) from None
    if cfg.tracing.otlp_endpoint:
        _check_url(cfg.tracing.otlp_endpoint, "tracing.otlp_endpoint", path_ok=True)
        if importlib.util.find_spec("opentelemetry") is None:
            raise ConfigError(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed "
                "(pip install 'affinity-node[otel]')"
            )
    level = cfg.logging.level.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"logging.level: {cfg.logging.level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    cfg.logging.level = level
    if not cfg.backends:
        raise ConfigError("backends: at least one backend is needed")
    allow = cfg.allow
    for i, backend in enumerate(cfg.backends):
        if bool(backend.url) == bool(backend.dns):
            raise ConfigError(f"backends[{i}]: give either url, or dns with port")
        if backend.dns:
            if not backend.port:
                raise ConfigError(f"backends[{i}].port: needed with dns")
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", backend.dns):
                raise ConfigError(f"backends[{i}].dns: {backend.dns!r} is not a DNS name")
        else:
            _check_url(backend.url, f"backends[{i}].url")
            if not allow.allows_url(backend.url):
                raise ConfigError(f"backends[{i}].url: {backend.url!r} is not in backends.allow")
        for j, model in enumerate(backend.models):
            if not model.strip():
                raise ConfigError(f"backends[{i}].models[{j}]: must not be empty")
    for i, model_cfg in enumerate(cfg.models):
        if not model_cfg.name.strip():
            raise ConfigError(f"models[{i}].name: must not be empty")
    _check_database_dsn(cfg.database)
    if cfg.database.listen_dsn:
        check_dsn(cfg.database.listen_dsn, "database.listen_dsn")


def _check_database_dsn(db: DatabaseConfig) -> None:
    if db.dsn and db.dsn_file:
        raise ConfigError("database.dsn and database.dsn_file are both set: give one of them")
    if not db.dsn and not db.dsn_file:
        raise ConfigError(
            "database.dsn is empty: set it in the config or in AFFINITY_DATABASE_DSN "
            "(or name a file holding it in AFFINITY_DATABASE_DSN_FILE; API keys live in "
            "Postgres even with affinity.store: memory)"
        )
    try:
        dsn = db.startup_dsn()
    except OSError as exc:
        raise ConfigError(str(exc)) from None
    check_dsn(dsn, "database.dsn_file" if db.dsn_file else "database.dsn")


TARGET_SESSION_ATTRS: Final = (
    "any", "primary", "standby", "prefer-standby", "read-write", "read-only"
)  # fmt: skip
"""What asyncpg accepts for `target_session_attrs`."""


def dsn_hosts(dsn: str) -> list[str]:
    """The hosts of a (multi-host) DSN's netloc, in order; empty for a socket-only DSN."""
    netloc = urlsplit(dsn).netloc.rpartition("@")[2]
    return [h for h in netloc.split(",") if h]


def check_dsn(dsn: str, key: str) -> None:
    """A postgresql:// URL whose `target_session_attrs`, when given, asyncpg knows."""
    try:
        parts = urlsplit(dsn)
    except ValueError as exc:
        raise ConfigError(f"{key}: not a valid URL ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{key}: must start with postgresql:// (or postgres://)")
    for attrs in parse_qs(parts.query).get("target_session_attrs", []):
        if attrs not in TARGET_SESSION_ATTRS:
            raise ConfigError(
                f"{key}: target_session_attrs={attrs!r} is not one of "
                f"{', '.join(TARGET_SESSION_ATTRS)}"
            )


def _quiet_dsn(db: DatabaseConfig) -> str:
    try:
        return db.startup_dsn()
    except OSError:
        return ""


def advice(cfg: NodeConfig) -> list[str]:
    """Legal but risky settings, each one line, logged by `serve` at start."""
    limits = cfg.limits
    notes = []
    for key, dsn in (
        ("database.dsn", _quiet_dsn(cfg.database)),
        ("database.listen_dsn", cfg.database.listen_dsn),
    ):
        attrs = parse_qs(urlsplit(dsn).query).get("target_session_attrs", ["any"])[-1]
        if len(dsn_hosts(dsn)) > 1 and attrs not in ("read-write", "primary"):
            notes.append(
                f"{key} lists several hosts without target_session_attrs=read-write: after a "
                "failover a node may connect to a read-only standby"
            )
    if limits.drain_timeout_seconds < limits.generation_timeout_seconds:
        notes.append(
            f"limits.drain_timeout_seconds ({limits.drain_timeout_seconds:g}) is shorter than "
            f"limits.generation_timeout_seconds ({limits.generation_timeout_seconds:g}): "
            "a shutdown cuts generations that are still allowed to run"
        )
    if limits.upstream_read_timeout_seconds > limits.generation_timeout_seconds:
        notes.append(
            f"limits.upstream_read_timeout_seconds ({limits.upstream_read_timeout_seconds:g}) "
            f"is longer than limits.generation_timeout_seconds "
            f"({limits.generation_timeout_seconds:g}): a silent stream outlives any generation"
        )
    if cfg.logging.access and cfg.logging.key_ref == "hmac" and not cfg.logging.key_ref_secret:
        notes.append(
            "logging.access is on without logging.key_ref_secret: access lines name no tenant "
            "(set the secret, the same on every node, or logging.key_ref: name)"
        )
    return notes


# -- reload (SIGHUP) -------------------------------------------------------------------------

RELOADABLE: Final = frozenset(
    {
        "logging.level",
        "logging.json",
        "logging.access",
        "limits.upstream_read_timeout_seconds",
        "limits.generation_timeout_seconds",
        "limits.client_write_timeout_seconds",
        "limits.client_body_read_timeout_seconds",
        "limits.drain_timeout_seconds",
        "backends",
    }
)
"""What a running node applies on SIGHUP: each is read per request (or at the drain), or is
the static backend list (joined and left as the registry's). Anything else needs a rollout."""


def _flat(cfg: NodeConfig) -> dict[str, Any]:
    """`section.key` -> value for every key; `backends` whole (it is compared entry by entry)."""
    out: dict[str, Any] = {}
    for name, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def unreloadable_changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The keys `new` changes that a running node cannot apply (names only: a value may be a
    secret). In `backends`, only whole `url` entries may come and go: a changed entry or a DNS
    entry needs a restart."""
    before, after = _flat(old), _flat(new)
    refused = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in RELOADABLE)  # fmt: skip
    if [b for b in old.backends if b.dns] != [b for b in new.backends if b.dns]:
        refused.append("backends (dns entries)")
    old_urls = {b.url: b for b in old.backends if b.url}
    for b in new.backends:
        if b.url in old_urls and old_urls[b.url] != b:
            refused.append(f"backends ({b.url}: models or kind)")
    return refused


def _without_password(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return ""
    user, _, hosts = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}@{hosts}" if user else hosts
    query = "&".join(p for p in parts.query.split("&") if not p.startswith("password="))
    return parts._replace(netloc=netloc, query=query).geturl()


def config_summary(cfg: NodeConfig) -> dict[str, Any]:
    """Every key's value, passwords left out (fit for a debug log line and for the hash)."""
    flat = _flat(cfg)
    for key in ("database.dsn", "database.listen_dsn"):
        flat[key] = _without_password(flat[key])
    return flat


def config_hash(cfg: NodeConfig) -> str:
    """12 hex digits naming the configuration in effect, the same on every node that loaded
    the same file and environment (node_id and passwords left out: it is shown in a metric)."""
    flat = config_summary(cfg)
    flat.pop("node_id", None)
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
