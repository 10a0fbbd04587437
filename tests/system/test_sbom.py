"""Supply chain: the image's SBOM (CycloneDX, `make sbom`) lists exactly what the image installs.

The image installs deploy/requirements.lock with `--require-hashes --only-binary=:all:`
(deploy/Dockerfile) and builds its wheel with the backend pinned in
deploy/build-requirements.lock. The SBOM is made from the first lock; these tests check it
against the lock's pins and hashes and against what pip resolves from that lock with the
Dockerfile's own flags, so a package the image gets that the SBOM does not name fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "deploy" / "requirements.lock"
BUILD_LOCK = REPO / "deploy" / "build-requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def pins(lock: Path) -> dict[str, tuple[str, set[str]]]:
    """A pip-compile lock: canonical name -> (version, its sha256 hashes)."""
    out: dict[str, tuple[str, set[str]]] = {}
    text = re.sub(r"^\s*#.*\n", "", lock.read_text(encoding="utf-8"), flags=re.M)
    for block in re.split(r"\n(?=\S)", text):
        m = PIN.match(block)
        if m:
            hashes = set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
            out[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return out


def make_sbom(path: Path) -> dict[str, Any]:
    """The SBOM exactly as CI makes it (`make sbom`, called by .ci/run)."""
    if shutil.which("cyclonedx-py", path=str(Path(sys.executable).parent)) is None:
        if os.environ.get("CI") == "true":
            pytest.fail("cyclonedx-py is missing: pip install -e '.[dev]'")
        pytest.skip("cyclonedx-py is not installed (dev extra cyclonedx-bom)")
    venv = Path(sys.executable).parent.parent
    subprocess.run(
        ["make", "-s", "-o", f"{venv}/.installed", "sbom", f"SBOM={path}", f"VENV={venv}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def components(sbom: dict[str, Any]) -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for c in sbom["components"]:
        hashes = {
            h["content"]
            for ref in c.get("externalReferences", [])
            for h in ref.get("hashes", [])
            if h["alg"] == "SHA-256"
        }
        name = canonicalize_name(c["name"])
        assert name not in out, f"{name} twice in the SBOM"
        assert c["purl"].startswith(f"pkg:pypi/{name}@{c['version']}"), c["purl"]
        out[name] = (c["version"], hashes)
    return out


def test_ci_makes_the_sbom() -> None:
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make sbom\b", run, re.M), ".ci/run does not make the SBOM"
    assert run.index("make sbom") < run.index("make test")


def test_the_sbom_names_every_locked_package_with_its_version_and_hashes(tmp_path: Path) -> None:
    sbom = make_sbom(tmp_path / "sbom.cdx.json")
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"].startswith("1.")
    root = sbom["metadata"]["component"]
    assert root["name"] == "affinity-node"  # the version is dynamic: not in pyproject
    locked = pins(LOCK)
    assert len(locked) > 10, "the lock did not parse"
    assert components(sbom) == locked


def test_the_sbom_lists_what_the_image_installs(tmp_path: Path) -> None:
    """pip resolves the lock with the Dockerfile's flags (dry run, nothing installed): the
    packages it would put in the image are the SBOM's, name for name, version for version."""
    sbom = components(make_sbom(tmp_path / "sbom.cdx.json"))
    report = tmp_path / "report.json"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    flags = ["--require-hashes", "--only-binary=:all:"]
    assert f"pip install {' '.join(flags)} -r requirements.lock" in dockerfile
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q"]
    result = subprocess.run(
        [*pip, *flags, "--report", str(report), "-r", str(LOCK)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(result.stderr)
        pytest.skip(f"pip cannot resolve the lock here (no index?): {result.stderr[-300:]}")
    installed = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text(encoding="utf-8"))["install"]
    }
    assert installed == {name: version for name, (version, _) in sbom.items()}


def test_the_build_backend_is_pinned_with_hashes() -> None:
    """pyproject's build-system.requires, each pinned (and its dependencies) in
    deploy/build-requirements.lock; the image builds with it, without build isolation."""
    build = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    locked = pins(BUILD_LOCK)
    for spec in build["requires"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in {BUILD_LOCK.name}"
        assert req.specifier.contains(locked[name][0]), (spec, locked[name][0])
    assert all(hashes for _, hashes in locked.values()), "a pin without a hash"
    assert canonicalize_name(build["build-backend"].split(".")[0]) in locked
    # Nothing of the build reaches the runtime lock (the image's runtime venv).
    assert not {"hatchling"} & set(pins(LOCK))
