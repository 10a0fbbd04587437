"""External tools a test needs (haproxy, promtool, openssl, ...): a developer without one gets
a skip that says what to install; under CI=true a missing tool fails, since .ci/run installs
every one and a skip there would hide a test that never ran."""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str, install: str = "") -> NoReturn:
    """Skips, or fails under CI=true. `what`: the missing thing; `install`: how to get it."""
    if in_ci():
        pytest.fail(f"{what} is missing, and CI=true requires it (.ci/run installs it)")
    pytest.skip(f"{what} is missing" + (f" ({install})" if install else ""))


def require_tool(name: str, install: str = "") -> str:
    """The binary's path on PATH; skips when absent, fails under CI=true."""
    path = shutil.which(name)
    if path is None:
        missing(f"the {name} command", install)
    return path


def require_module(name: str, package: str) -> None:
    """A Python module from a dev dependency; skips when absent, fails under CI=true."""
    if importlib.util.find_spec(name) is None:
        missing(f"Python package {package!r}", "a dev dependency: pip install -e '.[dev]'")
