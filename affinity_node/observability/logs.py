"""Logging: request ids on every line, JSON lines, secret scrubbing, rate limiting.

The HTTP middleware sets `REQUEST_ID` for the duration of each request (a context variable,
so tasks started while handling it inherit it); `RequestContextFilter` copies it onto every
record a handler emits, so a line logged deep in the pool or the engine names the request.

What never reaches a log line above debug: an API key (the filter masks anything shaped like
one, as a last line of defence), or an API key id together with a model (call sites log
backends and operations, never pairs).

Times are UTC with milliseconds and the zone (`2026-11-27T10:15:02.317Z`), in text and JSON
lines alike. The access log (`logging.access: true`) is one JSON line per API request on the
logger `affinity_node.access`, whatever `logging.json` says: see `AccessLog`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import IO, Any, Final
from uuid import UUID

REQUEST_ID: ContextVar[str | None] = ContextVar("affinity_request_id", default=None)
"""The id of the request being handled by the current task, if any."""

_SECRET: Final = re.compile(r"(?<![A-Za-z0-9_])sk-[A-Za-z0-9_\-]{6,}")
_MASK: Final = "sk-***"

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

ACCESS_LOGGER: Final = "affinity_node.access"


def utc_time(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: `2026-11-27T10:15:02.317Z`."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{millis:03d}Z"


class RequestContextFilter(logging.Filter):
    """Adds `request_id` to each record ("-" outside a request) and masks API keys.

    Attach it to handlers (filters on a logger do not see records propagated from its
    children). It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get() or "-"
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it, not the caller
            return True
        if "sk-" in message:
            masked = _SECRET.sub(_MASK, message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


class RateLimitedLog:
    """Logs a message at most once per `interval` seconds per key, counting the suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d similar suppressed)"
            args = (*args, skipped)
        self._logger.warning(msg, *args)


def _request_id(record: logging.LogRecord) -> str | None:
    rid = getattr(record, "request_id", None)
    if rid is None:
        rid = REQUEST_ID.get()
    return None if rid in (None, "", "-") else str(rid)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": utc_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _request_id(record)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """Human-readable lines; `[request id]` or `[-]` outside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_time(record.created)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get() or "-"
        return super().format(record)


ACCESS_FIELDS: Final = (
    "ts",
    "node",
    "request_id",
    "method",
    "route",
    "model",
    "backend",
    "status",
    "duration_ms",
    "ttft_ms",
    "affinity",
    "error",
    "key_ref",
    "client",
    "stream",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "trace_id",
)
"""The keys of every access line, in this order (null when not known for the request).
Never an API key or a key id: the tenant is `key_ref` (an HMAC of the key id, or the key's
name when the operator opts in)."""

KEY_REF_CHARS: Final = 24
"""Hex characters of the HMAC kept: 96 bits, no collision among any real number of keys."""
_KEY_REFS_MAX: Final = 100_000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """listen.trusted_proxies (checked by the config) as networks."""
    return tuple(ipaddress.ip_network(e, strict=False) for e in entries)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: tuple[Network, ...]
) -> str | None:
    """The client: the peer, unless it is a trusted proxy; then X-Forwarded-For read from the
    right, skipping trusted hops (what a client writes on the left is not believed)."""
    if not trusted or peer is None or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for line in forwarded_for for h in line.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop if _is_address(hop) else None
    return hops[0] if hops and _is_address(hops[0]) else peer


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


class KeyRefs:
    """`key_ref` of the access log: HMAC-SHA256 of the key id with the configured secret (the
    same secret on every node gives the same ref everywhere; without it the id cannot be
    recovered), or the key's name from `names` when the operator opts in."""

    def __init__(self, secret: str, names: Callable[[UUID], str | None] | None = None) -> None:
        self._secret = secret.encode()
        self._names = names
        self._refs: dict[UUID, str] = {}

    @classmethod
    def by_name(cls) -> KeyRefs:
        """Names, as last read by `set_names` (a key created since reads null until then)."""
        refs = cls("")
        refs.set_names({})
        return refs

    @property
    def wants_names(self) -> bool:
        return self._names is not None

    def set_names(self, names: dict[UUID, str]) -> None:
        self._names = names.get

    def __call__(self, key_id: UUID | None) -> str | None:
        if key_id is None:
            return None
        if self._names is not None:
            return self._names(key_id)
        if not self._secret:
            return None
        ref = self._refs.get(key_id)
        if ref is None:
            digest = hmac.new(self._secret, key_id.bytes, hashlib.sha256).hexdigest()
            ref = digest[:KEY_REF_CHARS]
            if len(self._refs) >= _KEY_REFS_MAX:
                self._refs.clear()
            self._refs[key_id] = ref
        return ref


class AccessLog:
    """Writes one access line per request through the `affinity_node.access` logger.

    The record's message is a short text summary (for any handler); `record.access` holds the
    fields, which `AccessFormatter` writes as one JSON object.
    """

    def __init__(
        self,
        node_id: str,
        key_refs: KeyRefs | None = None,
        trusted_proxies: Sequence[str] = (),
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        """Whether a request's fields are worth gathering (see `NullAccessLog`); switched by
        a config reload (`logging.access`)."""
        self._node = node_id
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self.key_ref = key_refs or KeyRefs("")
        self.trusted = trusted_networks(trusted_proxies)

    def emit(
        self,
        *,
        request_id: str,
        method: str,
        route: str,
        status: int,
        duration_s: float,
        model: str | None,
        backend: str | None,
        ttft_s: float | None,
        affinity: str | None,
        error: str | None,
        key_ref: str | None = None,
        client: str | None = None,
        stream: bool | None = None,
        tokens: tuple[int, int, int] | None = None,
        trace_id: str | None = None,
    ) -> None:
        """`tokens`: prompt, cached, completion, as the backend reported them."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "node": self._node,
            "request_id": request_id,
            "method": method,
            "route": route,
            "model": model,
            "backend": backend,
            "status": status,
            "duration_ms": round(duration_s * 1000, 3),
            "ttft_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
            "affinity": affinity,
            "error": error,
            "key_ref": key_ref,
            "client": client,
            "stream": stream,
            "prompt_tokens": None if tokens is None else tokens[0],
            "cached_tokens": None if tokens is None else tokens[1],
            "completion_tokens": None if tokens is None else tokens[2],
            "trace_id": trace_id,
        }
        logger.info(
            "%s %s %d %.1fms",
            method,
            route,
            status,
            duration_s * 1000,
            extra={"access": fields, "request_id": request_id},
        )


class NullAccessLog:
    """The access log while `logging.access` is off: the route wrapper checks `enabled`
    before it gathers a request's fields, as cheap as the None check it replaces."""

    enabled: Final = False

    def emit(self, **_fields: object) -> None:
        pass


class AccessFormatter(logging.Formatter):
    """The access line: `{"ts": ..., "node": ..., ...}` with every key of ACCESS_FIELDS."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "access", None) or {"msg": record.getMessage()}
        return json.dumps({"ts": utc_time(record.created), **fields})


def configure_logging(
    level: str, json_lines: bool, stream: IO[str] | None = None, *, access: bool = False
) -> None:
    """The process's logging: one handler on the root logger (stderr unless `stream`); with
    `access`, the access lines go to the same stream as JSON, at INFO whatever `level` is."""
    target = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(target)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access_logger = logging.getLogger(ACCESS_LOGGER)
    if access:
        access_handler = logging.StreamHandler(target)
        access_handler.setFormatter(AccessFormatter())
        access_handler.addFilter(RequestContextFilter())
        access_logger.handlers[:] = [access_handler]
        access_logger.setLevel(logging.INFO)
        access_logger.propagate = False
    else:
        access_logger.handlers[:] = []
        access_logger.setLevel(logging.NOTSET)
        access_logger.propagate = True
