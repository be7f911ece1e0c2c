"""The MLflow Model Registry: register the champion with what it takes to reproduce it, move
its alias only as `compare.promote` says, and find the model `predict` uses by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from filelock import FileLock

from pipeline.config import dataset_name, load_params, resolve, store_root
from pipeline.errors import PipelineError
from pipeline.logs import setup_logging

log = logging.getLogger(__name__)

# registry tag `format` of models logged by log_video_classifier; bump when the interface changes
MODEL_FORMAT = "video-pyfunc/1"


PROMOTE_POLICIES = ("better", "always")
# `compare.register_as`'s stand-in for the dataset's name: one registered model per dataset
DATASET_PLACEHOLDER = "{dataset}"
# registered-model tag: the dataset whose models a registered model holds
DATASET_TAG = "dataset_name"


def registered_name(register_as: str, dataset: str) -> str:
    """The registered model that holds `dataset`'s champion: `compare.register_as` with
    `{dataset}` replaced by the dataset's name (handball-action-classifier-uniri_hbd)."""
    return register_as.replace(DATASET_PLACEHOLDER, dataset)


def champion_uri(params: dict) -> str:
    """`models:/<registered model>@<alias>` of the champion of this config's dataset."""
    name = registered_name(params["compare"]["register_as"], dataset_name(params["dataset"]))
    return f"models:/{name}@{params['compare']['alias']}"


def registered_dataset(client, name: str, alias: str) -> str | None:
    """The dataset whose models registered model `name` holds: its `dataset_name` tag or,
    in a store from before that tag, its champion's; None for a new or empty one."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return None
    if model.tags.get(DATASET_TAG):
        return model.tags[DATASET_TAG]
    try:
        return client.get_model_version_by_alias(name, alias).tags.get(DATASET_TAG)
    except MlflowException:
        return None


def check_promote_policy(policy: str) -> None:
    if policy not in PROMOTE_POLICIES:
        raise PipelineError(f"compare.promote={policy!r}: one of {PROMOTE_POLICIES}")


def promotion_reason(
    candidate: dict[str, str], current: dict[str, str] | None, policy: str
) -> str | None:
    """Why the alias should move to `candidate` (version tags), or None to leave it where it is.

    `policy` is `compare.promote`: `always` follows every pipeline run's best model; `better`
    moves only to a model that beats the current champion's validation score
    (`selected_by`, e.g. `val_macro_f1`) on the same dataset and split, so a queued sweep
    leaves the alias on its best point, not on whichever ran last. Test scores never decide.
    """
    check_promote_policy(policy)
    if current is None:
        return "there is no champion yet"
    if policy == "always":
        return "compare.promote is 'always'"
    if current.get("format") != candidate.get("format"):
        return (
            f"the champion's model format {current.get('format', 'keras (no preprocessing)')}"
            f" is not {candidate.get('format')}"
        )
    if current.get("dataset_hash") != candidate["dataset_hash"]:
        return "the champion was chosen on other data"
    if current.get("split_hash") != candidate.get("split_hash"):
        return "the champion was chosen on another split of the data"
    metric = candidate["selected_by"]
    if current.get("selected_by") != metric or metric not in current:
        return f"the champion was not chosen by {metric}"
    if float(candidate[metric]) > float(current[metric]):
        return f"{metric} {candidate[metric]} beats the champion's {current[metric]}"
    return None


REGISTERED_MODEL_DESCRIPTION = """\
Handball action classifier of this project's pipeline: one of `frame_cnn`, `cnn3d`, `cnn_gru`,
or their `ensemble` (the average of their probabilities), with its preprocessing, as an MLflow
pyfunc. Input: a DataFrame with a `video` column (the
file's bytes, base64) or `path`; output: `top_action`, `top_probability` and every class's
probability. The `champion` alias is the best model by **validation** score; it moves only to
a model that beats it on the same data and split (`compare.promote: better`). Each version's
description says which model, data, split and scores it is.
"""


def version_description(best: dict, tags: dict, metric: str) -> str:
    """A registered version's description: which model on which data and split, how it was
    chosen, its scores, where its config is."""
    selected_by = f"val_{metric}"
    exp = f", DVC experiment `{tags['dvc_exp_name']}`" if tags.get("dvc_exp_name") else ""
    return (
        f"**{best['model']}** trained on **{tags['dataset_name']}** (dataset "
        f"`{tags['dataset_hash'][:12]}`, split `{tags['split_hash'][:12]}`; git "
        f"`{tags['git_commit'][:8]}`{exp}).\n\n"
        f"Chosen by validation {metric} {best[selected_by]:.3f}, the best of its pipeline run. "
        f"Test {metric} {best[metric]:.3f} [{best[metric + '_low']:.3f}, "
        f"{best[metric + '_high']:.3f}] (reported, never used to choose).\n\n"
        f"Config: `{tags['config_artifact']}`."
    )


def mark_champion_run(client, version, previous, label: str) -> None:
    """Tag the training run of the new champion `champion` (the run page then says so) and
    take the tag off the previous champion's run."""
    from mlflow.exceptions import MlflowException

    if previous is not None and previous.run_id and previous.run_id != version.run_id:
        with contextlib.suppress(MlflowException):  # the old run or its tag is gone
            client.delete_tag(previous.run_id, "champion")
    client.set_tag(version.run_id, "champion", label)


def model_ref(params: dict, model: str) -> dict:
    """Where model's latest training run lives in MLflow (`reports/<model>/mlflow.json`:
    run_id, model_uri), or {} when the file is absent."""
    ref_file = resolve(params["paths"]["reports"]) / model / "mlflow.json"
    return json.loads(ref_file.read_text()) if ref_file.is_file() else {}


def register_champion(params: dict, best: dict, ref: dict, dataset: dict):
    """Register the best model's logged MLflow model (`ref`: its `model_ref`) as a version of
    `compare.register_as` and move `compare.alias` to it as `compare.promote` decides.

    Returns the version the alias points at afterwards, or None when the training run is not
    in this MLflow store (e.g. reports restored next to an empty store), which is logged.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import git_commit

    cfg = params["compare"]
    if not cfg.get("register_as"):
        return None
    name, alias = registered_name(cfg["register_as"], dataset["name"]), cfg["alias"]
    run_id = ref.get("run_id", "")
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        client.get_logged_model(ref["model_uri"].removeprefix("models:/"))
    except (MlflowException, KeyError):
        log.warning(
            "not registering %s: its training run %r or logged model is not in %s "
            "(retrain it with `dvc repro -f train@%s`)",
            best["model"],
            run_id,
            mlflow.get_tracking_uri(),
            best["model"],
        )
        return None
    metric = cfg["metric"]
    selected_by = f"val_{metric}"
    tags = {
        "model": best["model"],
        "git_commit": run.data.tags.get("git_commit") or git_commit(),
        "dvc_exp_name": run.data.tags.get("dvc_exp_name", ""),
        "dataset_hash": dataset["dataset_hash"],
        "split_hash": dataset.get("split_hash", ""),
        "dataset_name": dataset["name"],
        "selected_by": selected_by,
        "format": MODEL_FORMAT,
        selected_by: f"{best[selected_by]:.4f}",
        # reported, never used to choose
        f"test_{metric}": f"{best[metric]:.4f}",
        f"test_{metric}_ci": f"[{best[metric + '_low']:.4f}, {best[metric + '_high']:.4f}]",
        # the composed config is the run's artifact `config.yaml` (a tag would swamp the UI)
        "config_artifact": f"runs:/{run_id}/config.yaml",
    }
    # Queued experiments finish concurrently: read, decide and move the alias one at a time.
    with FileLock(store_root() / "mlflow.db.lock"):
        holds = registered_dataset(client, name, alias)
        if holds not in (None, dataset["name"]):
            log.warning(
                "not registering %s: %s holds models of %s, and a model trained on %s never "
                "joins them or takes their @%s; give each dataset a registered model of its "
                "own (compare.register_as with %s in it, as the default)",
                best["model"],
                name,
                holds,
                dataset["name"],
                alias,
                DATASET_PLACEHOLDER,
            )
            return None
        # A run restored from DVC's run cache is registered once, however often it comes back.
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if existing:
            version = existing[0]
        else:
            version = mlflow.register_model(ref["model_uri"], name, tags=tags)
            client.update_model_version(
                name, version.version, description=version_description(best, tags, metric)
            )
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
        client.set_registered_model_tag(name, DATASET_TAG, dataset["name"])
        try:
            current = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            current = None
        if current is not None and current.version == version.version:
            log.info("%s@%s is already %s (run %s)", name, alias, best["model"], run_id)
            return current
        reason = promotion_reason(
            tags, current.tags if current else None, cfg.get("promote", "better")
        )
        if reason is None:
            log.info(
                "%s (run %s, %s %s) is %s version %s; @%s stays on version %s (%s %s, "
                "compare.promote=better)",
                best["model"],
                run_id,
                selected_by,
                tags[selected_by],
                name,
                version.version,
                alias,
                current.version,
                selected_by,
                current.tags.get(selected_by),
            )
            return current
        client.set_registered_model_alias(name, alias, version.version)
        mark_champion_run(client, version, current, f"{name}@{alias} (version {version.version})")
    log.info(
        "registered %s (run %s) as %s version %s, alias @%s: %s",
        best["model"],
        run_id,
        name,
        version.version,
        alias,
        reason,
    )
    return client.get_model_version(name, version.version)


def default_model(params: dict, store: str) -> tuple[str, str]:
    """(model URI, what it is): the registered champion, else the best model of the latest
    comparison run in the project's MLflow store."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    uri = champion_uri(params) if params["compare"].get("register_as") else None
    if uri:
        name, alias = uri.removeprefix("models:/").split("@")
        try:
            version = client.get_model_version_by_alias(name, alias)
            return (
                uri,
                f"the registered {name}@{alias}: version {version.version}, "
                f"{version.tags.get('model', '?')} from run {version.run_id}",
            )
        except MlflowException:
            pass
    experiment = client.get_experiment_by_name(params["mlflow"]["experiment"])
    runs = (
        client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.model = 'comparison'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if experiment
        else []
    )
    if runs and runs[0].data.tags.get("best_model_uri"):
        tags = runs[0].data.tags
        return (
            tags["best_model_uri"],
            f"no {uri} is registered; the best model ({tags.get('best_model')}) "
            f"of the latest comparison run {runs[0].info.run_id}",
        )
    raise PipelineError(
        f"no model to use: no registered {uri} and no comparison run "
        f"in {store}. Run the pipeline first (`dvc repro`) or pass --model URI"
    )


def main(argv: list[str] | None = None) -> None:
    """Print the model URI of the champion of this project's dataset (`make serving-image`)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--params", type=Path, help="params.yaml (default: the project's)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
    except (PipelineError, FileNotFoundError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    if not params["compare"].get("register_as"):
        log.error("compare.register_as is null: this project registers no champion")
        sys.exit(2)
    sys.stdout.write(champion_uri(params) + "\n")


if __name__ == "__main__":
    main()
