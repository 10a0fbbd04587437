"""Parsing of the JSON payloads our triggers send. Any role that can connect can notify on these
channels, so a payload is untrusted input: strict types and lengths (as the table's CHECKs),
no NaN or Infinity; malformed input is dropped with a rate-limited warning. Even a well-formed
event is only a doorbell: the node reads the table after it (routing/trust.py)."""

from __future__ import annotations

import json
import logging
from typing import Any, cast
from uuid import UUID

from affinity_node.observability.logs import RateLimitedLog
from affinity_node.routing.ports import BindingEvent
from affinity_node.vocabulary import KEY_EVENT_OPS, NOTIFY_OPS, KeyEventOp

log = logging.getLogger(__name__)
_warn = RateLimitedLog(log)

MAX_PAYLOAD = 8000
MAX_MODEL = 256
MAX_BACKEND = 2048
MAX_MEMBERS = 15

BINDINGS_CHANNEL = "affinity_changes"
KEYS_CHANNEL = "api_key_changes"


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _text(value: object, limit: int, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ValueError(f"{what} must be a string of 1..{limit} characters")
    return value


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number")
    return float(value)


def _members(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_MEMBERS:
        raise ValueError(f"fanout_urls must be a list of at most {MAX_MEMBERS}")
    return tuple(_text(v, MAX_BACKEND, "fanout_urls item") for v in value)


def _load(payload: str) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too long")
    data = json.loads(payload, parse_constant=_no_constants)
    if not isinstance(data, dict):
        raise ValueError("payload is not an object")
    return data


def parse_binding_event(payload: str) -> BindingEvent | None:
    try:
        data = _load(payload)
        op = data["op"]
        if op not in NOTIFY_OPS:
            raise ValueError(f"unknown op {op!r}")
        version = data["version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError("version must be an integer")
        return BindingEvent(
            op=cast(Any, op),
            pair=(
                UUID(_text(data["api_key_id"], 36, "api_key_id")),
                _text(data["model"], MAX_MODEL, "model"),
            ),
            backend=_text(data["provider_url"], MAX_BACKEND, "provider_url"),
            version=version,
            ttl=_number(data["ttl"], "ttl"),
            sent_at=_number(data["sent_at"], "sent_at"),
            fanout=_members(data.get("fanout_urls", [])),
        )
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        _warn.warning(
            "malformed",
            "dropping a malformed binding notification (%d bytes): %s",
            len(payload),
            exc,
        )
        return None


def parse_key_event(payload: str) -> tuple[KeyEventOp, UUID] | None:
    try:
        data = _load(payload)
        op = data["op"]
        if op not in KEY_EVENT_OPS:
            raise ValueError(f"unknown op {op!r}")
        return cast(KeyEventOp, op), UUID(_text(data["id"], 36, "id"))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        _warn.warning(
            "malformed-key",
            "dropping a malformed key notification (%d bytes): %s",
            len(payload),
            exc,
        )
        return None
