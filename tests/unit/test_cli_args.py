"""Every command-line argument is checked by its type: a bad value ends in argparse's one-line
error (exit 2), never in a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from affinity_node.argtypes import CHECKED_TYPES
from affinity_node.cli import build_parser

UNCHECKED_OK = {"--seed"}
"""Any integer is a valid seed (argparse's own `int` already refuses a non-number)."""


def parsers(
    parser: argparse.ArgumentParser, path: str = "affinity-node"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}")


def test_every_typed_argument_is_checked() -> None:
    unchecked = []
    typed = 0
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if action.type is None or isinstance(action, argparse._SubParsersAction):
                continue
            typed += 1
            name = action.option_strings[0] if action.option_strings else action.dest
            if action.type not in CHECKED_TYPES and name not in UNCHECKED_OK:
                unchecked.append(f"{path} {name}: {action.type!r}")
    assert unchecked == []
    assert typed >= 40


def test_ids_and_numbers_that_once_needed_a_type() -> None:
    """Arguments that used to be plain strings or unchecked numbers."""
    parser = build_parser()
    for argv in (
        ["keys", "revoke", "not-a-uuid"],
        ["bindings", "list", "--api-key-id", "7"],
        ["bindings", "purge", "--model", ""],
        ["keys", "create", "--name", " "],
        ["fake-backend", "--port", "70000", "--id", "b", "--model", "m"],
        ["fake-backend", "--port", "8000", "--id", "b", "--model", "m", "--tokens-per-s", "0"],
        ["fake-backend", "--port", "8000", "--id", "b", "--model", "m", "--ttft-base", "-1"],
        ["migrate", "--dsn", "host=db user=affinity"],
        ["bench", "--url", "lb:8080", "--api-key", "sk-x"],
        ["bench", "--url", "http://lb:8080", "--duration", "-5"],
        ["bench", "--url", "http://lb:8080", "--rate", "nan"],
        ["demo", "--nodes", "0"],
        ["demo", "--rate", "inf"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2, argv
    args = parser.parse_args(["keys", "revoke", str(uuid.UUID(int=7))])
    assert args.id == uuid.UUID(int=7)
    assert parser.parse_args(["migrate", "--dsn", ""]).dsn == ""  # unset: the command says so


def affinity_node(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "affinity_node", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_a_dsn_asyncpg_cannot_use_is_one_line_without_a_traceback() -> None:
    """Refused while parsing the DSN, before any connection is tried."""
    result = affinity_node("keys", "list", "--dsn", "postgresql://u@127.0.0.1:1/db?sslmode=bogus")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: `sslmode` parameter must be one of")


def test_a_bad_argument_is_one_line_on_stderr_without_a_traceback() -> None:
    result = affinity_node("keys", "revoke", "not-a-uuid")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "affinity-node keys revoke: error: argument id: 'not-a-uuid' is not a key id (a UUID)"
    )
