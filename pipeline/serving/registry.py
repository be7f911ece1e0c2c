"""The MLflow Model Registry: register the champion with what it takes to reproduce it, move
its alias only as `compare.promote` says, and find the model `predict` uses by default.
"""

from __future__ import annotations

import contextlib
import json
import logging

from filelock import FileLock

from pipeline.config import resolve, store_root
from pipeline.errors import PipelineError, is_refusal
from pipeline.schema.sections import Compare

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


def registered_dataset(client, name: str, alias: str) -> str | None:
    """The dataset whose models registered model `name` holds: its `dataset_name` tag or,
    in a store from before that tag, its champion's; None for a new or empty one."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if is_refusal(exc):  # not "no such model": the server said no
            raise
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


def model_ref(reports: str, model: str) -> dict:
    """Where model's latest training run lives in MLflow (`<reports>/<model>/mlflow.json`:
    run_id, model_uri), or {} when the file is absent."""
    ref_file = resolve(reports) / model / "mlflow.json"
    return json.loads(ref_file.read_text()) if ref_file.is_file() else {}


def register_champion(cfg: Compare, best: dict, ref: dict, dataset: dict):
    """Register the best model's logged MLflow model (`ref`: its `model_ref`) as a version of
    its dataset's registered model (`compare.register_as`) and move `compare.alias` to it as
    `compare.promote` decides: find its training run -> describe it in tags -> (one process
    at a time) refuse another dataset's registered model -> register -> move the alias.

    Returns the version the alias points at afterwards, or None when nothing was registered
    (no `register_as`; the training run not in this store, e.g. reports restored next to an
    empty store; a registered model of other data), which is logged.
    """
    from mlflow.tracking import MlflowClient

    if cfg.register_as is None:
        return None
    name, alias = registered_name(cfg.register_as, dataset["name"]), cfg.alias
    client = MlflowClient()
    run = training_run(client, best["model"], ref)
    if run is None:
        return None
    tags = version_tags(best, run, dataset, cfg.metric)
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
        version = registered_version(
            client, name, ref, tags, version_description(best, tags, cfg.metric)
        )
        return move_alias(client, name, alias, version, tags, cfg.promote)


def training_run(client, model: str, ref: dict):
    """The MLflow run that trained the model `ref` points at, or None (logged) when it or its
    logged model is not in this store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(ref.get("run_id", ""))
        client.get_logged_model(ref["model_uri"].removeprefix("models:/"))
    except (MlflowException, KeyError):
        log.warning(
            "not registering %s: its training run %r or logged model is not in %s "
            "(retrain it with `dvc repro -f train@%s`)",
            model,
            ref.get("run_id", ""),
            mlflow.get_tracking_uri(),
            model,
        )
        return None
    return run


def version_tags(best: dict, run, dataset: dict, metric: str) -> dict[str, str]:
    """What a registered version says about itself: which model, code, data and split, how
    it was chosen (its validation score), its test score, where its config is."""
    from pipeline.tracking import git_commit

    selected_by = f"val_{metric}"
    return {
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
        "config_artifact": f"runs:/{run.info.run_id}/config.yaml",
    }


def registered_version(client, name: str, ref: dict, tags: dict, description: str):
    """The version of `name` holding the run's model: registered now (with `tags` and
    `description`), or the one registered before (a run restored from DVC's run cache is
    registered once, however often it comes back). The registered model gets its
    description once and its dataset's tag."""
    import mlflow

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{ref['run_id']}'")
    if existing:
        version = existing[0]
    else:
        version = mlflow.register_model(ref["model_uri"], name, tags=tags)
        client.update_model_version(name, version.version, description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    client.set_registered_model_tag(name, DATASET_TAG, tags["dataset_name"])
    return version


def move_alias(client, name: str, alias: str, version, tags: dict, policy: str):
    """Move `alias` to `version` when `promotion_reason` gives a reason (marking the runs of
    the new and the old champion); returns the version the alias points at afterwards."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    model, run_id, selected_by = tags["model"], version.run_id, tags["selected_by"]
    if current is not None and current.version == version.version:
        log.info("%s@%s is already %s (run %s)", name, alias, model, run_id)
        return current
    reason = promotion_reason(tags, current.tags if current else None, policy)
    if reason is None:
        log.info(
            "%s (run %s, %s %s) is %s version %s; @%s stays on version %s (%s %s, "
            "compare.promote=better)",
            model,
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
        model,
        run_id,
        name,
        version.version,
        alias,
        reason,
    )
    return client.get_model_version(name, version.version)
