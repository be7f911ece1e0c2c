"""What a contributor relies on: the pre-commit hooks catch what they promise (a private key, a
large file) on a real `pre-commit run` in a scratch repository, the console scripts of
`[project.scripts]` are installed and answer `--help`, and the LICENSE file is the licence
pyproject.toml declares. The hooks' environment comes from PyPI on first use (pre-commit's
cache), as it does for a contributor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, run

BIN = Path(sys.executable).parent
# a key's header, assembled so this file does not trip the hook itself
PRIVATE_KEY = "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----\n"


def test_the_hooks_refuse_a_private_key_and_a_large_file(tmp_path):
    if not (BIN / "pre-commit").exists():
        pytest.skip("pre-commit is not installed (make setup-dev installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    run(["git", "init", "-q", "-b", "main"], tmp_path, env)
    shutil.copy2(ROOT / ".pre-commit-config.yaml", tmp_path)
    (tmp_path / "deploy.pem").write_text(PRIVATE_KEY)
    (tmp_path / "clips.npy").write_bytes(b"\0" * 2 * 1024 * 1024)
    (tmp_path / "notes.txt").write_text("nothing secret\n")
    run(["git", "add", "-A"], tmp_path, env)
    hooks = ["detect-private-key", "check-added-large-files"]
    outcome = {}
    for hook in hooks:
        proc = subprocess.run(
            [
                str(BIN / "pre-commit"),
                "run",
                hook,
                "--files",
                "deploy.pem",
                "clips.npy",
                "notes.txt",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        outcome[hook] = (proc.returncode, proc.stdout)
    assert outcome["detect-private-key"][0] == 1
    assert "deploy.pem" in outcome["detect-private-key"][1]
    assert "notes.txt" not in outcome["detect-private-key"][1]
    assert outcome["check-added-large-files"][0] == 1
    assert "clips.npy" in outcome["check-added-large-files"][1]


def test_the_console_scripts_are_installed_and_answer_help():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"handball-predict", "handball-params", "handball-sweep"} <= set(scripts)
    for name in scripts:
        proc = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name} --help: {proc.stderr[-2000:]}"
        assert "usage" in proc.stdout.lower() or "hydra" in proc.stdout.lower(), proc.stdout


def test_the_license_file_is_the_declared_licence():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
