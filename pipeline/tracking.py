"""MLflow set-up shared by the stages: the repository's SQLite store and artifact root."""

from __future__ import annotations

import logging
import os
import subprocess

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.common import repo_root, store_root

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """`sqlite:///<repository>/mlflow.db`, anchored at DVC_ROOT so queued experiments, which run
    in temporary copies, log into the repository's own store."""
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def use_experiment(name: str) -> str:
    """Point MLflow at the repository store and return the id of experiment `name`.

    The experiment is created with its artifact root under `<repo root>/mlruns`, never the
    working directory of whichever process happens to create it first.
    """
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = (store_root() / "mlruns").as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo_root(),
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(model: str, dataset: dict | None = None) -> dict[str, str]:
    """Tags of a run on `dataset` (the clean stage's dataset.json; None when the run has no
    data of its own): what it is, from which commit and DVC experiment, on which data and
    split."""
    dataset = dataset or {}
    return {
        "model": model,
        "git_commit": git_commit(),
        "dataset_hash": dataset.get("dataset_hash", ""),
        "split_hash": dataset.get("split_hash", ""),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
    }


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": value} for mlflow.log_params."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out
