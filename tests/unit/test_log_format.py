"""Log line formats: UTC times with milliseconds and the zone; the access line's shape."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from affinity_node.observability.logs import (
    ACCESS_FIELDS,
    ACCESS_LOGGER,
    AccessLog,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    utc_time,
)

RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root, access = logging.getLogger(), logging.getLogger(ACCESS_LOGGER)
    saved = (root.handlers[:], root.level, access.handlers[:], access.level, access.propagate)
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    access.handlers[:], access.level, access.propagate = saved[2], saved[3], saved[4]


def record(msg: str = "hello") -> logging.LogRecord:
    rec = logging.LogRecord("affinity_node.test", logging.WARNING, __file__, 1, msg, None, None)
    rec.created = 1_795_000_000.0456  # 2026-11-18T11:06:40.045Z
    return rec


def test_times_are_utc_with_milliseconds_and_zone() -> None:
    assert utc_time(1_795_000_000.0456) == "2026-11-18T11:06:40.045Z"
    assert utc_time(0.999) == "1970-01-01T00:00:00.999Z"
    line = json.loads(JsonFormatter().format(record()))
    assert line["ts"] == "2026-11-18T11:06:40.045Z"
    text = TextFormatter().format(record())
    assert text.startswith("2026-11-18T11:06:40.045Z WARNING affinity_node.test [-]: hello")


def test_access_lines_are_json_whatever_the_main_format(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("WARNING", json_lines=False, stream=buf, access=True)
    logging.getLogger("affinity_node.test").info("not shown at WARNING")
    AccessLog("node-a").emit(
        request_id="r-1",
        method="POST",
        route="/v1/chat/completions",
        status=200,
        duration_s=0.0123456,
        model="llama-3.1-8b",
        backend="http://10.0.0.7:8000",
        ttft_s=0.004,
        affinity="hit",
        error=None,
    )
    (line,) = buf.getvalue().splitlines()
    fields = json.loads(line)
    assert list(fields) == list(ACCESS_FIELDS)
    assert RFC3339_MS.fullmatch(fields["ts"])
    assert fields | {"ts": None} == {
        "ts": None,
        "node": "node-a",
        "request_id": "r-1",
        "method": "POST",
        "route": "/v1/chat/completions",
        "model": "llama-3.1-8b",
        "backend": "http://10.0.0.7:8000",
        "status": 200,
        "duration_ms": 12.346,
        "ttft_ms": 4.0,
        "affinity": "hit",
        "error": None,
        "key_ref": None,
        "client": None,
        "stream": None,
        "prompt_tokens": None,
        "cached_tokens": None,
        "completion_tokens": None,
        "trace_id": None,
    }


def test_access_log_off_writes_nothing_of_its_own(restore_logging: None) -> None:
    buf = io.StringIO()
    configure_logging("INFO", json_lines=True, stream=buf, access=False)
    access = logging.getLogger(ACCESS_LOGGER)
    assert access.handlers == [] and access.propagate
