"""MLflow set-up shared by the stages: the repository's SQLite store and artifact root."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.tracking import MlflowClient

from pipeline.config import SPLITS, repo_root, resolve, store_root

if TYPE_CHECKING:
    from pipeline.schema.sections import DatasetBase

log = logging.getLogger(__name__)


def project_store_uri() -> str:
    """`sqlite:///<repository>/mlflow.db`, anchored at DVC_ROOT so queued experiments, which
    run in temporary copies, log into the repository's own store."""
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    """Where runs and models go: MLFLOW_TRACKING_URI where it is set (a team's tracking server,
    e.g. `http://mlflow.example.org:5000`), else the repository's own store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or project_store_uri()


def uses_project_store() -> bool:
    """Whether runs go to the repository's own store (not a tracking server)."""
    return tracking_uri() == project_store_uri()


# The MLflow UI opens an experiment of this kind on its training runs ("Machine learning"),
# not on the GenAI overview (traces, evaluations) it shows when the kind is unknown.
EXPERIMENT_KIND = "custom_model_development"
# The tag the MLflow UI shows and edits as a run's, an experiment's description.
DESCRIPTION_TAG = "mlflow.note.content"
EXPERIMENT_DESCRIPTION = """\
Handball action recognition: runs of this project's DVC pipeline (`dvc repro`, `dvc exp run`).

- **Model runs**, one per trained model (`frame_cnn`, `cnn3d`, `cnn_gru`), named
  `model · dataset · DVC experiment`: test scores `test_*` (chosen on nothing), validation
  scores `eval_val_*` (what the champion is chosen by), learning curves, the confusion matrix,
  the composed config (`config.yaml`) and the logged model. With `train_seeds`, nested
  `… · seed N` runs hold the other seeds' test scores.
- **comparison** runs, one per pipeline run: the side-by-side table with 95% intervals and the
  baseline rows (artifacts `comparison.md`, `comparison.png`; metrics under `comparison/`).

Compare models: filter by dataset (Datasets column), tick the model runs, press **Compare**.
The champion (best validation score) is registered under **Models** with the `champion` alias
and tagged `champion` on its run.
"""


def describe_experiment(client, experiment_id: str) -> None:
    """Give the experiment its kind and description where it has none (a user's own stay)."""
    tags = client.get_experiment(experiment_id).tags
    wanted = {"mlflow.experimentKind": EXPERIMENT_KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}
    for key, value in wanted.items():
        if not tags.get(key):
            client.set_experiment_tag(experiment_id, key, value)


def run_name(what: str, dataset: dict | None = None) -> str:
    """`cnn3d · cricket_shots · fetid-inti`: what the run is, on which dataset, in which DVC
    experiment (the last two where there is one)."""
    parts = [what, (dataset or {}).get("name"), os.environ.get("DVC_EXP_NAME")]
    return " · ".join(str(p) for p in parts if p)


def use_experiment(name: str) -> str:
    """Point MLflow at the repository store and return the id of experiment `name`.

    In the repository's store the experiment is created with its artifact root under
    `<repo root>/mlruns`, never the working directory of whichever process happens to create
    it first; on a tracking server, where the server puts artifacts. It is described
    (`describe_experiment`), also when it was created by an older version of the pipeline.
    """
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        artifacts = (store_root() / "mlruns").as_uri() if uses_project_store() else None
        try:
            exp_id = client.create_experiment(name, artifact_location=artifacts)
        except mlflow.exceptions.MlflowException:  # created concurrently by another stage
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    describe_experiment(client, exp_id)
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


def lock_digest() -> str:
    """The first 16 hex digits of the sha256 of the workspace's `uv.lock` (what `make setup`
    installs from), "" where there is none."""
    lock = repo_root() / "uv.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else ""


def installed_digest() -> str:
    """The first 16 hex digits of the sha256 of every installed distribution's name==version,
    sorted: differs from another run's when anything installed differs, lock or not."""
    from importlib.metadata import distributions

    pins = sorted({f"{d.metadata['Name'].lower()}=={d.version}" for d in distributions()})
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def run_tags(model: str, dataset: dict | None = None) -> dict[str, str]:
    """Tags of a run on `dataset` (the clean stage's dataset.json; None when the run has no
    data of its own): what it is, from which commit and DVC experiment, on which data and
    split, in which environment (the lock's digest and that of what is installed)."""
    dataset = dataset or {}
    return {
        "model": model,
        "git_commit": git_commit(),
        "uv_lock_sha256": lock_digest(),
        "installed_sha256": installed_digest(),
        "dataset_hash": dataset.get("dataset_hash", ""),
        "split_hash": dataset.get("split_hash", ""),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
    }


def dataset_source(ds: DatasetBase) -> str:
    """Where the clips came from, for MLflow's dataset source: the URL, the folder or archive,
    or the sample generator."""
    if ds.url:
        return ds.url
    return resolve(ds.path or ds.tracked).as_uri()


def log_dataset(ds: DatasetBase, dataset: dict, train_clips: int, clean_dir: Path) -> None:
    """What the model was trained on, in the active MLflow run: the split table as an MLflow
    dataset (name, digest of the clips' content and split, source; the UI's Datasets column),
    clip counts and what the clean stage quarantined and why (metrics `data_*`), and the
    quarantine report itself. `ds` is the `dataset` section, `dataset` what the clean stage
    recorded (`dataset.json`)."""
    import warnings

    import pandas as pd

    splits = pd.read_csv(clean_dir / "splits.csv", usecols=["path", "label", "split"])
    with warnings.catch_warnings():  # MLflow registers two local sources of the same name
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        data = mlflow.data.from_pandas(
            splits,
            source=dataset_source(ds),
            targets="label",
            name=dataset["name"],
            digest=dataset_digest(dataset),
        )
    mlflow.log_input(
        data,
        context="training",
        tags={f"{s}_clips": str(n) for s, n in split_counts(dataset).items()},
    )
    metrics = {
        "data_clips": dataset["clips"],
        "data_usable": dataset["usable"],
        "data_quarantined": dataset.get("quarantined", 0),
        "data_train_clips": train_clips,
    }
    metrics.update(
        {f"data_quarantined_{k}": v for k, v in dataset.get("quarantined_by_reason", {}).items()}
    )
    mlflow.log_metrics(metrics)
    if (clean_dir / "quarantine.csv").is_file():
        mlflow.log_artifact(str(clean_dir / "quarantine.csv"), artifact_path="data")


def split_counts(dataset: dict) -> dict[str, int]:
    """Clips per split, from the clean stage's per-class counts (`dataset.json`)."""
    counts = dataset.get("counts", {})
    return {s: sum(counts.get(s, {}).values()) for s in SPLITS}


def dataset_digest(dataset: dict) -> str:
    """MLflow's dataset digest: the first 8 hex digits of the content hash and of the split
    hash (`dataset_hash`, `split_hash` tags), so runs on the same clips split differently
    show different datasets."""
    return f"{dataset['dataset_hash'][:8]}-{dataset.get('split_hash', '')[:8]}"


def run_description(name: str, dataset: dict, seed: int, summary: dict) -> str:
    """The run's description in the MLflow UI: data, split, seeds, headline scores."""
    counts = split_counts(dataset)
    split = "given split file" if dataset.get("split_source") == "split_file" else "grouped split"
    seeds = f"seed {seed}"
    if summary.get("seeds"):
        seeds += (
            f"; over {summary['seeds']} seeds test macro-F1 "
            f"{summary['macro_f1_mean']:.3f} ± {summary['macro_f1_std']:.3f}"
        )
    return (
        f"**{name}** on **{dataset['name']}** ({len(dataset['classes'])} classes; "
        f"{split}: train {counts['train']} / val {counts['val']} / "
        f"test {counts['test']} clips), {seeds}.\n\n"
        f"Validation macro-F1 {summary['val_macro_f1']:.3f} (what the champion is chosen by); "
        f"test macro-F1 {summary['macro_f1']:.3f}, accuracy {summary['accuracy']:.3f} "
        f"(reported only). {summary['epochs']} epochs in {summary['train_time_s']:.0f} s. "
        f"Config: artifact `config.yaml`."
    )


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
