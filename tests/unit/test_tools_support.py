"""The one rule for a missing external tool: skip for a developer, fail under CI=true."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.support.tools import require_module, require_tool

ABSENT = "affinity-no-such-tool-7f3c"


def test_a_missing_tool_skips_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install it"):
        require_tool(ABSENT, "apt-get install it")


@pytest.mark.parametrize("value", ["true", "TRUE", "True"])
def test_a_missing_tool_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_tool(ABSENT)
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        require_module("affinity_no_such_module", "no-such-package")


def test_a_present_tool_is_its_path_even_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    name = "python3" if shutil.which("python3") else sys.executable
    assert require_tool(name) == shutil.which(name)
    require_module("pytest", "pytest")
