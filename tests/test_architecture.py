"""The package's shape: import contracts hold, modules stay small, every stage is a module
with a `main` that DVC runs and that names the modules it uses as deps."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 330  # "about 300"


def test_import_contracts_hold():
    """`lint-imports` with the contracts in pyproject.toml (layers, serving without training
    code, no cycles between siblings)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_import_contracts_catch_a_stage_import_in_serving(tmp_path):
    """The contracts are not vacuous: a serving module that imports a stage breaks them."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]'")
    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "pipeline" / "serving" / "clips.py"
    bad.write_text(bad.read_text() + "\nfrom pipeline.stages import train  # noqa\n")
    proc = subprocess.run(
        [exe, "--no-cache"],
        cwd=copy,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)},
    )
    assert proc.returncode != 0
    assert (
        "BROKEN" in proc.stdout and "pipeline.serving.clips -> pipeline.stages.train" in proc.stdout
    )


def test_no_module_is_long():
    lengths = {
        p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
        for p in (ROOT / "pipeline").rglob("*.py")
    }
    assert {p: n for p, n in lengths.items() if n > MAX_LINES} == {}


def test_every_dvc_stage_runs_a_stage_module_that_lists_its_code():
    """Each stage's `cmd` names `pipeline.stages.<stage>`, which has a `main`, and its deps
    include that module's file and every pipeline module it imports directly."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split()[2]
        assert module == f"pipeline.stages.{name}", (name, stage["cmd"])
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        imported = {
            n.module
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("pipeline.")
        }
        deps = set(stage["deps"])
        wanted = {path.relative_to(ROOT).as_posix()} | {
            m.replace(".", "/") + ".py" for m in imported
        }
        assert wanted <= deps, (name, sorted(wanted - deps))
