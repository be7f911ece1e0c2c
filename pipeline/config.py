"""The workspace and its configuration: where paths resolve, the composed `params.yaml`
(checked against `pipeline.schema`), and what the config names (splits, the dataset and its
classes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.schema import Params
    from pipeline.schema.sections import DatasetBase

SPLITS = ("train", "val", "test")


def repo_root() -> Path:
    """The workspace being run: `params.yaml`, `conf/` and every configured path resolve here.

    This is the working directory. DVC runs each stage in the folder of `dvc.yaml`, which for a
    queued experiment is a temporary copy of the repository; `DVC_ROOT` then still names the
    original repository, so it must not be used for inputs and outputs (see `store_root`).
    """
    return Path.cwd().resolve()


def store_root() -> Path:
    """Where the results that outlive a workspace live (`mlflow.db`, `mlruns/`): the repository
    DVC was started in (`DVC_ROOT`, also for queued experiments), else the workspace."""
    root = os.environ.get("DVC_ROOT")
    return Path(root).resolve() if root else repo_root()


def load_config(path: str | Path | None = None) -> Params:
    """The composed configuration (`params.yaml`) that every DVC stage reads, typed and checked
    against `pipeline.schema`: a PipelineError lists every problem, one line each, before a
    stage reads data or opens an MLflow run. A stage's `main()` hands each function its own
    sections of it."""
    from pipeline.schema import InvalidConfig, parse_params

    path = Path(path) if path else repo_root() / "params.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m pipeline.params` to compose it from conf/"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_params(yaml.safe_load(fh))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from None
    except InvalidConfig as exc:
        raise PipelineError(
            f"{path} breaks the config schema ({len(exc.problems)} problem(s); fix conf/ or "
            "the override and compose again with `python -m pipeline.params`):\n  "
            + "\n  ".join(exc.problems)
        ) from None


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """`load_config`'s mapping as written, for the scripts that change settings before they
    parse it (the benchmarks)."""
    return load_config(path).composed


def resolve(path: str | Path) -> Path:
    """A config path made absolute against the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path


def dataset_name(ds: DatasetBase) -> str:
    """`dataset.name`, or (when it is null) the name of the folder, archive or URL the clips
    come from (`cricket_shots` for `.../cricket_shots` or `cricket_shots.tar.gz`)."""
    if ds.name:
        return ds.name
    where = ds.url or ds.path or ds.source
    name = Path(where.rstrip("/").split("?")[0]).name or "dataset"
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def dataset_classes(configured: list[str] | None, clean_dir: str) -> list[str]:
    """The class list, in class-index order: `dataset.classes` (`configured`), or when that
    is null the classes the clean stage recorded in `clean_dir` (the class folders the
    download stage found)."""
    if configured:
        return list(configured)
    path = resolve(clean_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the clean stage first")
    return list(json.loads(path.read_text())["classes"])
