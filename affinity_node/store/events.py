"""Parsing of the JSON payloads our triggers send; malformed input is logged and dropped."""

from __future__ import annotations

import json
import logging
from typing import Any, cast
from uuid import UUID

from affinity_node.routing.ports import BindingEvent
from affinity_node.vocabulary import KEY_EVENT_OPS, NOTIFY_OPS, KeyEventOp

log = logging.getLogger(__name__)

BINDINGS_CHANNEL = "affinity_changes"
KEYS_CHANNEL = "api_key_changes"


def parse_binding_event(payload: str) -> BindingEvent | None:
    try:
        data: Any = json.loads(payload)
        op = data["op"]
        if op not in NOTIFY_OPS:
            raise ValueError(f"unknown op {op!r}")
        return BindingEvent(
            op=cast(Any, op),
            pair=(UUID(data["api_key_id"]), str(data["model"])),
            backend=str(data["provider_url"]),
            version=int(data["version"]),
            ttl=float(data["ttl"]),
            sent_at=float(data["sent_at"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("dropping malformed binding notification (%d bytes): %s", len(payload), exc)
        return None


def parse_key_event(payload: str) -> tuple[KeyEventOp, UUID] | None:
    try:
        data: Any = json.loads(payload)
        op = data["op"]
        if op not in KEY_EVENT_OPS:
            raise ValueError(f"unknown op {op!r}")
        return cast(KeyEventOp, op), UUID(data["id"])
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("dropping malformed key notification (%d bytes): %s", len(payload), exc)
        return None
