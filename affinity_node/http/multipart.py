"""The `model` field of a multipart form (audio uploads), read and rewritten in place.

Only the parts' headers are parsed, up to the one named `model`; the file's bytes are passed
over, never copied or decoded (the SDKs send `model` before the file, so that is usually the
first few hundred bytes).
"""

from __future__ import annotations

import re
from typing import Final

_BOUNDARY: Final = re.compile(r'boundary="?([^";]{1,200})"?', re.IGNORECASE)
_NAME: Final = re.compile(rb'(?i)content-disposition:[^\r\n]*;\s*name="([^"]*)"')
MAX_VALUE = 1024


def boundary(content_type: str) -> bytes | None:
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    return m.group(1).encode("latin-1", "replace") if m else None


def field_span(body: bytes, delimiter: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the value of form field `name` lies in `body` (start, end), or None."""
    marker = b"--" + delimiter
    pos = body.find(marker)
    while pos >= 0:
        head_start = pos + len(marker)
        if body.startswith(b"--", head_start):
            return None  # the closing delimiter
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        value_start = head_end + 4
        nxt = body.find(b"\r\n" + marker, value_start)
        if nxt < 0:
            return None
        m = _NAME.search(body, head_start, head_end)
        if m is not None and m.group(1) == name:
            return value_start, nxt
        pos = nxt + 2
    return None


def form_model(body: bytes, content_type: str) -> tuple[str, tuple[int, int]] | None:
    """The form's `model` and where its value lies; None when it has none (or is no form)."""
    delimiter = boundary(content_type)
    if delimiter is None:
        return None
    span = field_span(body, delimiter, b"model")
    if span is None or span[1] - span[0] > MAX_VALUE:
        return None
    try:
        return body[span[0] : span[1]].decode(), span
    except UnicodeDecodeError:
        return None
