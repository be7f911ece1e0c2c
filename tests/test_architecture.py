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


# Code no stage's outputs depend on, which therefore reruns no stage when edited: logging and
# TensorFlow's start-up silencing, the stage command line (params file, exit codes), the
# error class, and the config schema, which the `check_params` stage alone runs on every
# change of params.yaml (it refuses a bad config before any other stage starts).
RESULT_NEUTRAL = ("pipeline/logs.py", "pipeline/stages/cli.py", "pipeline/errors.py")


def module_file(module: str) -> Path | None:
    for path in (ROOT / (module.replace(".", "/") + ".py"), ROOT / module.replace(".", "/")):
        if path.suffix == ".py" and path.is_file():
            return path
        if (path / "__init__.py").is_file():
            return path / "__init__.py"
    return None


def pipeline_imports(path: Path) -> set[str]:
    """The pipeline modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return {m for m in found if module_file(m)}


def code_of(module: str) -> set[str]:
    """Every pipeline file `module` runs: what it imports, transitively (package __init__
    files aside)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(pipeline_imports(module_file(name)))
    return {
        module_file(m).relative_to(ROOT).as_posix()
        for m in seen
        if module_file(m).name != "__init__.py"
    }


def test_every_dvc_stage_runs_a_stage_module_that_lists_exactly_its_code():
    """Each stage's `cmd` names `pipeline.stages.<stage>`, which has a `main`, and its deps
    are exactly the pipeline files that module runs (transitively), less the result-neutral
    ones: an edit to any other reruns the stage; an edit to logging reruns none."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        module = stage["cmd"].split()[2]
        assert module == f"pipeline.stages.{name}", (name, stage["cmd"])
        path = ROOT / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
        neutral = set(RESULT_NEUTRAL)
        if name != "check_params":
            neutral |= {f for f in code_of(module) if f.startswith("pipeline/schema/")}
        wanted = code_of(module) - neutral
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        if name == "check_params":  # the schema package, __init__ included
            listed -= {"pipeline/schema/__init__.py"}
        assert listed == wanted, (name, sorted(wanted - listed), sorted(listed - wanted))
        assert "pipeline/logs.py" not in stage["deps"]


def functions_taking_the_whole_config(path: Path) -> list[str]:
    """The functions of `path` with a parameter named `params` or annotated as the typed
    whole config (`Params`), except the stages' `run(config)`, which unpacks it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name == "run":
            continue
        if node.args.args and node.args.args[0].arg == "self":  # e.g. MLflow's predict(params)
            continue
        for arg in node.args.args + node.args.kwonlyargs:
            annotation = ast.unparse(arg.annotation) if arg.annotation else ""
            if arg.arg == "params" or annotation == "Params":
                found.append(f"{node.name}({arg.arg}: {annotation or '?'})")
    return found


def test_below_the_stages_each_function_gets_its_own_sections():
    """Only a stage's `run(config)`, its orchestrator and the entry points see the whole config;
    the functions below them get the sections they read (`config.frames`, `config.paths`, …),
    typed."""
    entry = {"pipeline/stages/clean.py", "pipeline/stages/compare.py", "pipeline/params.py"}
    entry |= {"pipeline/serving/champion.py"}  # default_model: the dataset, compare, mlflow
    # train_and_evaluate and what it gathers from several sections: the model's FitJob, the
    # logged model's preprocessing record, the run's logged params and config.yaml
    entry |= {"pipeline/stages/train.py"}
    offenders = {
        rel: names
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
        if (rel := path.relative_to(ROOT).as_posix()) not in entry
        and not rel.startswith("pipeline/schema/")
        and (names := functions_taking_the_whole_config(path))
    }
    assert not offenders, f"functions below the stage layer take the whole config: {offenders}"
    assert all(functions_taking_the_whole_config(ROOT / rel) for rel in entry), (
        "an entry point no longer takes the whole config: drop it from `entry`"
    )
