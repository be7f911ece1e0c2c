"""The environment is pinned: `uv.lock` agrees with pyproject.toml, the hash-checked exports
that `make setup` and `make setup-dev` install from are the lock's own, and the lock installs on
every platform the project supports (a wheel for each). Runs uv from the dev install, offline:
`uv export --frozen` reads only the lock."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

UV = Path(sys.executable).parent / "uv"
EXPORTS = {
    "requirements/runtime.txt": [],
    "requirements/dev.txt": ["--extra", "dev"],
    "requirements/s3.txt": ["--extra", "s3"],  # deploy/training.Dockerfile
}


def project_entry(lock: dict) -> dict:
    [entry] = [p for p in lock["package"] if p["name"] == "handball-actions"]
    return entry


def declared(pyproject: dict) -> set[tuple]:
    """Every requirement of pyproject.toml as (name, extras, specifier, extra it belongs to)."""
    project = pyproject["project"]
    groups = {None: project["dependencies"], **project["optional-dependencies"]}
    return {
        (r.name, tuple(sorted(r.extras)), str(r.specifier), extra)
        for extra, items in groups.items()
        for r in map(Requirement, items)
    }


def locked(lock: dict) -> set[tuple]:
    """The same, as uv recorded them in the lock when it resolved."""
    out = set()
    for item in project_entry(lock)["metadata"]["requires-dist"]:
        marker = item.get("marker", "")
        extra = marker.split("'")[1] if marker.startswith("extra ==") else None
        spec = str(Requirement(f"x{item.get('specifier', '')}").specifier)
        out.add((item["name"], tuple(sorted(item.get("extras", []))), spec, extra))
    return out


def test_the_lock_agrees_with_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    missing = declared(pyproject) - locked(lock)
    stale = locked(lock) - declared(pyproject)
    assert not missing and not stale, (
        f"uv.lock is out of date (run `make lock`): not locked {sorted(missing)}, "
        f"no longer declared {sorted(stale)}"
    )
    assert SpecifierSet(lock["requires-python"]) == SpecifierSet(
        pyproject["project"]["requires-python"]
    )


@pytest.mark.parametrize("export", sorted(EXPORTS))
def test_the_installs_are_the_locks_exports_with_hashes(export):
    if not UV.exists():
        pytest.skip("uv is not installed (make setup-dev installs it)")
    cmd = [str(UV), "export", "--quiet", "--frozen", "--no-emit-project"]
    cmd += ["--format", "requirements-txt", *EXPORTS[export], "-o", export]
    # the same command `make lock` runs, written to stdout instead of the file
    proc = subprocess.run(
        [*cmd[:-2], "--no-header"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    committed = (ROOT / export).read_text()
    body = "\n".join(line for line in committed.splitlines() if not line.startswith("#"))
    expected = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith("#"))
    assert body.strip() == expected.strip(), f"{export} is not uv.lock's export: run `make lock`"
    pins = [line for line in committed.splitlines() if "==" in line and not line.startswith("#")]
    assert pins and all(line.endswith("\\") for line in pins)  # each pin followed by its hashes
    assert committed.count("--hash=sha256:") >= len(pins)


# the platforms of [tool.uv] as wheel tags say them: (operating system, machine)
PLATFORMS = {
    "linux-x86_64": ("manylinux", "x86_64"),
    "linux-aarch64": ("manylinux", "aarch64"),
    "macos-arm64": ("macosx", "arm64"),
}


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_the_lock_has_the_compiled_heavyweights_for_each_platform(platform):
    """A CPython 3.11 wheel of TensorFlow, OpenVINO and OpenCV for every supported platform."""
    system, machine = PLATFORMS[platform]
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    for name in ("tensorflow", "openvino", "opencv-python-headless"):
        [entry] = [p for p in lock["package"] if p["name"] == name]
        wheels = [w["url"].rsplit("/", 1)[-1] for w in entry["wheels"]]
        fitting = [
            w for w in wheels if system in w and machine in w and ("cp311" in w or "abi3" in w)
        ]
        assert fitting, f"no {platform} wheel of {name} {entry['version']} in uv.lock: {wheels}"
