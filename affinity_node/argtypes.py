"""Argument types for the command line: each checks its value's range or shape, so a bad
argument ends in argparse's one-line usage error (exit 2), never in a traceback.

`affinity-node keys revoke not-a-uuid` -> `affinity-node keys revoke: error: argument id:
'not-a-uuid' is not a key id (a UUID)`. tests/unit/test_cli_args.py checks that every option
of every command with a numeric or structured value uses one of these.
"""

from __future__ import annotations

import argparse
import math
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit


def _number(
    kind: type[int] | type[float], low: float | None, high: float | None, above: bool, what: str
) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if above else value < low):
            bound = f"greater than {low:g}" if above else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:g}, got {text}")
        return value

    parse.__name__ = what.removeprefix("a ").removeprefix("an ").replace(" ", "_")
    return parse


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    return int(_number(int, 0, 65535, False, "a port number")(text))


def positive_int(text: str) -> int:
    return int(_number(int, 1, None, False, "a whole number")(text))


def non_negative_int(text: str) -> int:
    return int(_number(int, 0, None, False, "a whole number")(text))


def rate_limit(high: int) -> Callable[[str], int]:
    """A per-key limit, 0 (remove it) to `high` (the database's CHECK)."""

    def parse(text: str) -> int:
        return int(_number(int, 0, high, False, "a whole number")(text))

    parse.__name__ = "rate_limit"
    return parse


requests_limit = rate_limit(100_000_000)
tokens_limit = rate_limit(100_000_000_000)
concurrency_limit = rate_limit(1_000_000)
priority_class = rate_limit(9)
"""A key's fair-queueing class, 0 (the default) to 9 (served first)."""


def positive_float(text: str) -> float:
    return float(_number(float, 0, None, True, "a number")(text))


def non_negative_float(text: str) -> float:
    return float(_number(float, 0, None, False, "a number")(text))


def key_id(text: str) -> uuid.UUID:
    """An API key id, as `keys create` and `keys list` print it."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a key id (a UUID)") from None


def dsn(text: str) -> str:
    """A Postgres URL (libpq's key=value form is not accepted by asyncpg); empty means unset
    (the command then says where to set it)."""
    if text and urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(
            "a DSN starts with postgresql:// or postgres:// (from --dsn or AFFINITY_DATABASE_DSN)"
        )
    return text


def http_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """Seconds, as `90`, `90s`, `10m`, `2h` or `1d`."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    seconds = float(_number(float, 0, None, True, "a duration like 90s, 10m or 2h")(number))
    return seconds * _UNITS[unit]


def backend_url(text: str) -> str:
    """A backend's URL, in the normalised form nodes and binding rows use."""
    from affinity_node.routing.backends import normalise_url

    try:
        return normalise_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def lora_adapter(text: str) -> tuple[str, str | None]:
    """`NAME[=PARENT]` of `fake-backend --lora` (no parent: the first --model)."""
    name, sep, parent = (part.strip() for part in text.partition("="))
    if not name or (sep and not parent):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME or NAME=PARENT")
    return name, parent or None


CHECKED_TYPES = frozenset(
    {
        port,
        positive_int,
        non_negative_int,
        requests_limit,
        tokens_limit,
        concurrency_limit,
        priority_class,
        positive_float,
        non_negative_float,
        key_id,
        dsn,
        http_url,
        non_empty,
        duration,
        backend_url,
        lora_adapter,
    }
)
"""The types above: the CLI test checks every typed option uses one of them."""
