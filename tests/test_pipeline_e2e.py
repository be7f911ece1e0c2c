"""End to end: a real `dvc repro` of the whole pipeline in a temporary git repository.

The `project` fixture (conftest.py) copies the project as git would clone it, composes
`params.yaml` with `experiment=tiny` and runs `dvc repro` once. Then: outputs, comparison,
champion and MLflow runs are checked, a second `dvc repro` must do nothing, `dvc plots show`
renders, a queued two-point `dvc exp run --queue` grid runs in DVC's temporary copies and
logs into the project's MLflow store, a point trained before comes back from the run cache, one
`cnn_gru` parameter invalidates only its stage, and Hydra multiruns record parent and child
runs. The tests run in file order on the same project.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    MODELS,
    TINY,
    champion_name,
    logged_model,
    new_shell_env,
    readme_commands,
    run,
    run_as_printed,
    run_json,
    stages_run,
)

from pipeline.logs import TF_STARTUP_NOISE
from pipeline.params import compose_params, dump_params

BASELINES = ["baseline_majority", "baseline_motion_logreg"]
RANKED = [*MODELS, "ensemble"]  # the rows ranked by validation score, above the baselines


def test_first_repro_runs_every_stage(project):
    repo, state = project
    expected = {
        "check_params",
        "download",
        "clean",
        "frames",
        "features",
        "baseline",
        "compare",
    } | {f"train@{m}" for m in MODELS}
    assert stages_run(state["first"]) == expected
    assert not (repo / "data" / "source").exists()  # data.dvc's target is absent, repro still ran
    # the stage processes keep TensorFlow's C++ start-up lines to themselves
    assert not TF_STARTUP_NOISE.search(state["first"]), state["first"][-3000:]


def test_outputs_metrics_and_reports(project):
    repo, _ = project
    for model in MODELS:
        metrics = json.loads((repo / "metrics" / f"{model}.json").read_text())
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "params", "train_time_s"):
            assert isinstance(metrics[key], (int, float)), (model, key)
        assert 0.0 <= metrics["macro_f1"] <= 1.0 and metrics["params"] > 0
        assert (repo / "models" / model / "model.keras").is_file()
        reports = repo / "reports" / model
        for name in (
            "confusion_matrix.png",
            "classification_report.txt",
            "per_class.csv",
            "history.csv",
        ):
            assert (reports / name).is_file(), (model, name)
        # predictions are aligned with the test clips they belong to
        predictions = pd.read_csv(reports / "predictions.csv")
        splits = pd.read_csv(repo / "data" / "clean" / "splits.csv")
        test = splits[splits["split"] == "test"]
        assert sorted(predictions["path"]) == sorted(test["path"])
        assert (predictions["actual"] == predictions["label"]).all()
        assert (
            predictions.set_index("path")["actual"]
            == test.set_index("path")["label"].loc[predictions["path"]]
        ).all()
        # the gallery: one strip of frames per misclassified test clip (up to gallery.max_clips)
        wrong = int((predictions["actual"] != predictions["predicted"]).sum())
        rows = min(
            wrong, yaml.safe_load((repo / "params.yaml").read_text())["gallery"]["max_clips"]
        )
        gallery = cv2.imread(str(reports / "misclassified.png"))
        assert gallery is not None, model
        assert (gallery.shape[0] >= 150 * rows) if rows else (gallery.shape[0] < 150), (model, rows)
    table = pd.read_csv(repo / "reports" / "comparison.csv")
    assert sorted(table["model"]) == sorted(RANKED + BASELINES)
    assert all(m in (repo / "reports" / "comparison.md").read_text() for m in RANKED + BASELINES)


def test_the_ensemble_row_pools_the_models_probabilities(project):
    """Every model writes its validation and test probabilities; the ensemble row is their
    geometric mean with equal weights, renormalised over the classes (`compare.ensemble`:
    `weights: equal`, `pooling: geometric`), scored like a model, with its reports."""
    repo, _ = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    classes = params["dataset"]["classes"]
    splits = pd.read_csv(repo / "data" / "clean" / "splits.csv").set_index("path")
    tables = []
    for model in MODELS:
        table = pd.read_csv(repo / "reports" / model / "probabilities.csv")
        assert set(table["seed"]) == {params["seed"]} and set(table["split"]) == {"val", "test"}
        assert (splits.loc[table["path"], "split"].to_numpy() == table["split"].to_numpy()).all()
        assert table[classes].sum(axis=1).to_numpy() == pytest.approx(1, abs=1e-4)
        tables.append(table[table["split"] == "test"].set_index("path")[classes])
    assert params["compare"]["ensemble"]["pooling"] == "geometric"
    product = np.prod([t.loc[tables[0].index].clip(lower=1e-12) for t in tables], axis=0)
    geometric = product ** (1 / len(tables))
    pooled = pd.DataFrame(geometric, index=tables[0].index, columns=classes)
    pooled = pooled.div(pooled.sum(axis=1), axis=0)
    ensemble = repo / "reports" / "ensemble"
    predictions = pd.read_csv(ensemble / "predictions.csv").set_index("path")
    assert list(predictions.loc[pooled.index, "predicted"]) == list(pooled.idxmax(axis=1))
    assert predictions.loc[pooled.index, "confidence"].to_numpy() == pytest.approx(
        pooled.max(axis=1).to_numpy(), abs=1e-3
    )
    for name in ("confusion_matrix.png", "classification_report.txt", "per_class.csv"):
        assert (ensemble / name).is_file(), name
    weights = json.loads((ensemble / "weights.json").read_text())
    assert weights == {str(params["seed"]): {m: pytest.approx(1 / 3, abs=1e-4) for m in MODELS}}
    row = pd.read_csv(repo / "reports" / "comparison.csv").set_index("model").loc["ensemble"]
    assert row["kind"] == "ensemble" and row["test_clips"] == len(pooled)
    costs = [json.loads((repo / "metrics" / f"{m}.json").read_text()) for m in MODELS]
    assert row["params"] == sum(c["params"] for c in costs)
    assert (
        "ensemble: the members' probabilities averaged (geometric mean)"
        in (repo / "reports" / "comparison.md").read_text()
    )


def test_comparison_has_intervals_per_class_f1_and_costs(project):
    repo, state = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    table = pd.read_csv(repo / "reports" / "comparison.csv").set_index("model")
    for score in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert (table[f"{score}_low"] <= table[score] + 1e-9).all(), score
        assert (table[score] <= table[f"{score}_high"] + 1e-9).all(), score
    for model in MODELS:
        per_class = pd.read_csv(repo / "reports" / model / "per_class.csv").set_index("class")
        for c in params["dataset"]["classes"]:
            assert table.loc[model, f"f1_{c}"] == pytest.approx(per_class.loc[c, "f1"])
        assert table.loc[model, "inference_ms_per_clip"] > 0
    # cnn_gru's cost per clip includes the feature backbone it needs on a new clip
    gru = json.loads((repo / "metrics" / "cnn_gru.json").read_text())
    assert gru["backbone_ms_per_clip"] > 0
    assert gru["inference_ms_per_clip"] == pytest.approx(
        gru["model_ms_per_clip"] + gru["backbone_ms_per_clip"], abs=0.02
    )
    # models and their ensemble are ranked by validation score (never test), then the baselines
    metric = params["compare"]["metric"]
    assert sorted(table.index[:4]) == sorted(RANKED) and list(table.index[4:]) == BASELINES
    val = table.loc[RANKED, f"val_{metric}"]
    assert list(table[f"val_{metric}"].iloc[:4]) == sorted(val, reverse=True)
    for model in MODELS:
        saved = json.loads((repo / "metrics" / f"{model}.json").read_text())
        assert table.loc[model, f"val_{metric}"] == pytest.approx(saved[f"val_{metric}"])
    # `dvc metrics show` sees the comparison; its JSON is strict (no NaN for a baseline's costs)
    shown = run(["dvc", "metrics", "show", "--json"], repo, state["env"])
    assert "comparison.json" in shown and "macro_f1_low" in shown
    comparison = json.loads(
        (repo / "metrics" / "comparison.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"{c} in comparison.json"),
    )
    assert comparison["baseline_majority"]["params"] is None


def test_baseline_rows_and_flags(project):
    """The baseline stage's two rows (fitted on train, C chosen on validation) are in the
    comparison with intervals; a model that does not beat the logistic regression on test,
    or predicts one class, is flagged."""
    repo, _ = project
    baseline = json.loads((repo / "metrics" / "baseline.json").read_text())
    logreg = baseline["motion_logreg"]
    assert logreg["C"] in yaml.safe_load((repo / "params.yaml").read_text())["baseline"]["C"]
    assert logreg["val_macro_f1"] == pytest.approx(
        max(logreg["val_macro_f1_by_C"].values()), abs=1e-4
    )  # the per-C scores are rounded
    table = pd.read_csv(repo / "reports" / "comparison.csv").set_index("model")
    bar = table.loc["baseline_motion_logreg", "macro_f1"]
    assert table.loc["baseline_motion_logreg", "macro_f1"] == pytest.approx(logreg["macro_f1"])
    assert table.loc["baseline_majority", "predicted_classes"] == 1
    for model in RANKED:
        flags = str(table.loc[model, "flags"]) if pd.notna(table.loc[model, "flags"]) else ""
        assert ("does not beat the baseline" in flags) == (table.loc[model, "macro_f1"] <= bar)
        assert ("predicts one class" in flags) == (table.loc[model, "predicted_classes"] == 1)


def test_best_model_is_the_registered_champion(project):
    import mlflow
    from mlflow.tracking import MlflowClient

    repo, state = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cfg = params["compare"]
    best = pd.read_csv(repo / "reports" / "comparison.csv")["model"].iloc[0]
    ref = logged_model(repo, best)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = champion_name(params)
    assert name == "handball-action-classifier-sample"  # the generated sample's own
    version = client.get_model_version_by_alias(name, cfg["alias"])
    assert version.run_id == ref["run_id"]
    assert version.tags["model"] == best
    dataset = json.loads((repo / "data" / "clean" / "dataset.json").read_text())
    assert version.tags["dataset_hash"] == dataset["dataset_hash"]
    assert version.tags["split_hash"] == dataset["split_hash"]
    # chosen on validation; the test score is reported next to it
    assert version.tags["selected_by"] == f"val_{cfg['metric']}"
    best_row = pd.read_csv(repo / "reports" / "comparison.csv").iloc[0]
    assert float(version.tags[f"val_{cfg['metric']}"]) == pytest.approx(
        best_row[f"val_{cfg['metric']}"], abs=1e-4
    )
    assert float(version.tags[f"test_{cfg['metric']}"]) == pytest.approx(
        best_row[cfg["metric"]], abs=1e-4
    )
    assert version.tags["git_commit"] == state["commit"]
    assert "dvc_exp_name" in version.tags
    # the config is the training run's artifact, not a tag; the version says what it is
    assert "config" not in version.tags
    mlflow.set_tracking_uri(uri)
    config = yaml.safe_load(mlflow.artifacts.load_text(version.tags["config_artifact"]))
    assert config == params
    assert best in version.description and "validation" in version.description
    assert client.get_registered_model(name).description
    assert client.get_registered_model(name).tags["dataset_name"] == "sample"
    # the champion's run page says it is the champion
    assert client.get_run(ref["run_id"]).data.tags["champion"].startswith(f"{name}@{cfg['alias']}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{cfg['alias']}")
    assert model.metadata.run_id == ref["run_id"]


def test_splits_never_share_a_scene(project):
    repo, _ = project
    splits = pd.read_csv(repo / "data" / "clean" / "splits.csv")
    assert splits.groupby("group")["split"].nunique().max() == 1
    assert set(splits["split"]) == {"train", "val", "test"}


def test_mlflow_runs_are_comparable(project):
    from mlflow.tracking import MlflowClient

    repo, state = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
    assert exp is not None
    assert exp.artifact_location == (repo / "mlruns").as_uri()
    runs = client.search_runs([exp.experiment_id])
    by_model = {r.data.tags["model"]: r for r in runs}
    assert set(by_model) == set(MODELS) | {"comparison"} and len(runs) == 4
    # the UI opens on training runs and says what they are
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "comparison" in exp.tags["mlflow.note.content"]
    dataset = json.loads((repo / "data" / "clean" / "dataset.json").read_text())
    for what, run_ in by_model.items():
        assert run_.info.run_name == f"{what} · {dataset['name']}"  # no DVC experiment here
        assert run_.data.tags["mlflow.note.content"]
    comparison_metrics = set(by_model["comparison"].data.metrics)
    assert comparison_metrics and all(k.startswith("comparison/") for k in comparison_metrics)
    metric = params["compare"]["metric"]
    for row in [*RANKED, *BASELINES]:
        assert f"comparison/{row}_test_{metric}" in comparison_metrics
    assert f"comparison/cnn3d_test_{metric}_low" in comparison_metrics
    # the same names in every run; a model's other networks (tiny: cnn3d's second) log theirs
    # as member<k>/<name> beside them
    metric_keys = [{k for k in by_model[m].data.metrics if "/" not in k} for m in MODELS]
    assert metric_keys[0] == metric_keys[1] == metric_keys[2]
    assert "member2/val_loss" in by_model["cnn3d"].data.metrics
    dataset_hash = json.loads((repo / "data" / "clean" / "dataset.json").read_text())[
        "dataset_hash"
    ]
    commit = state["commit"]
    for model in MODELS:
        run_ = by_model[model]
        assert run_.info.status == "FINISHED"
        assert run_.data.tags["git_commit"] == commit
        assert run_.data.tags["dataset_hash"] == dataset_hash
        assert "dvc_exp_name" in run_.data.tags
        # the environment: the lock it was installed from, and what is installed
        lock = hashlib.sha256((repo / "uv.lock").read_bytes()).hexdigest()[:16]
        assert run_.data.tags["uv_lock_sha256"] == lock
        assert len(run_.data.tags["installed_sha256"]) == 16
        for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "val_loss"):
            assert key in run_.data.metrics
        epochs = json.loads((repo / "metrics" / f"{model}.json").read_text())["epochs"]
        val_losses = [k for k in run_.data.metrics if k.split("/")[-1] == "val_loss"]
        logged = sum(len(client.get_metric_history(run_.info.run_id, k)) for k in val_losses)
        assert logged == epochs  # every network's epochs
        assert run_.data.params["model.name"] == model
        artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
        assert {
            "confusion_matrix.png",
            "classification_report.txt",
            "misclassified.png",
            "config.yaml",
        } <= artifacts
        # the run's dataset (the UI's Datasets column): name, digest of content and split
        (data_input,) = run_.inputs.dataset_inputs
        assert data_input.dataset.name == dataset["name"]
        assert data_input.dataset.digest == (
            f"{dataset['dataset_hash'][:8]}-{dataset['split_hash'][:8]}"
        )
        input_tags = {t.key: t.value for t in data_input.tags}
        assert input_tags["test_clips"] == str(sum(dataset["counts"]["test"].values()))
        # the logged model is named after the model and carries its scores
        (logged,) = client.search_logged_models(
            [exp.experiment_id], filter_string=f"source_run_id = '{run_.info.run_id}'"
        )
        assert logged.name == model
        scores = {m.key: m.value for m in logged.metrics}
        assert scores["test_macro_f1"] == pytest.approx(run_.data.metrics["test_macro_f1"])
        assert scores["eval_val_macro_f1"] == pytest.approx(run_.data.metrics["eval_val_macro_f1"])
        # logged once: Keras' per-epoch validation history keeps one point per epoch
        history = client.get_metric_history(run_.info.run_id, "val_accuracy")
        assert len(history) == len(client.get_metric_history(run_.info.run_id, "val_loss"))
        assert len(client.get_metric_history(run_.info.run_id, "test_macro_f1")) == 1
        # the logged model loads back as a video classifier around the trained Keras model
        import mlflow

        from pipeline.serving.pyfunc import load_video_classifier

        mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
        classifier, _ = load_video_classifier(f"runs:/{run_.info.run_id}/{model}")
        assert classifier.model.output_shape == (None, len(params["dataset"]["classes"]))
        assert (
            classifier.pre["model"] == model and classifier.classes == params["dataset"]["classes"]
        )
        assert classifier.pre["frames"] == {
            k: params["frames"][k] for k in classifier.pre["frames"]
        }
        if "features" in classifier.pre:  # served with what computed the evaluated features
            used = json.loads((repo / "data" / "features" / "runtime.json").read_text())
            assert {k: classifier.pre["features"][k] for k in used} == used


def test_second_repro_does_nothing(project):
    repo, state = project
    output = run(["dvc", "repro"], repo, state["env"])
    assert stages_run(output) == set()
    # the pipeline's stages; data.dvc alone reports "not in cache" in a clone without `dvc pull`
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], repo, state["env"]).lower()


def test_dvc_plots_render_confusion_matrices_and_learning_curves(project, tmp_path):
    from mlflow.tracking import MlflowClient

    repo, state = project
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo, state["env"])
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Test confusion matrices" in html and "Learning curves (validation loss)" in html
    plots = run_json(["dvc", "plots", "show", "--json"], repo, state["env"])["data"]
    confusion = plots["Test confusion matrices"][0]["content"]["data"]["values"]
    curves = plots["Learning curves (validation loss)"][0]["content"]["data"]["values"]
    for model in MODELS:
        clips = len(pd.read_csv(repo / "reports" / model / "predictions.csv"))
        # the first network's curve (tiny: cnn3d trains two), one point per epoch
        run_id = logged_model(repo, model)["run_id"]
        epochs = len(client.get_metric_history(run_id, "val_loss"))
        assert sum(v["filename"].endswith(f"{model}/predictions.csv") for v in confusion) == clips
        assert sum(v["filename"].endswith(f"{model}/history.csv") for v in curves) == epochs
        assert {"actual", "predicted"} <= set(confusion[0])


# the README's grid: neither is the default (0.3) nor a value another test trains through DVC,
# so nothing is restored from the run cache early
QUEUED_DROPOUTS = ("0.1", "0.5")


def wait_for_queue(repo: Path, env: dict, names: list[str], timeout_s: float = 900) -> None:
    """`dvc queue start` hands the experiments to background workers: poll until they end."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = run(["dvc", "queue", "status"], repo, env)
        rows = {
            line.split()[1]: line.split()[-1]
            for line in status.splitlines()
            if len(line.split()) >= 5 and line.split()[1] in names
        }
        if len(rows) == len(names) and all(s in ("Success", "Failed") for s in rows.values()):
            break
        assert time.monotonic() < deadline, f"queue still busy after {timeout_s} s:\n{status}"
        time.sleep(3)
    for name, result in rows.items():
        assert result == "Success", run(["dvc", "queue", "logs", name], repo, env)[-5000:]


@pytest.mark.slow  # ~80 s; CI runs it (make test-all)
def test_queued_dvc_sweep_logs_each_experiment_into_the_root_store(project):
    """The README's grid, `dvc exp run --queue -S 'models.cnn_gru.dropout=0.1,0.5'` and
    `dvc queue start -j 2`, as printed in a new shell after `source .venv/bin/activate` (the
    queue's workers find `dvc`, and the stages `python`, on that PATH only). Both experiments
    run in DVC's temporary copies with their own parameters, appear in `dvc exp show`, and log
    their MLflow runs into the repository's own mlflow.db (artifacts under its mlruns/) tagged
    with the experiment name; the workspace is
    left as it was and the registry's champion is the best model it has seen on this data."""
    import hashlib

    from mlflow.tracking import MlflowClient

    repo, state = project
    env = state["env"]
    run(["git", "add", "-A"], repo, env)  # the user commits the pipeline's results first
    run(["git", "commit", "-q", "-m", "pipeline results"], repo, env)
    untouched = [repo / "params.yaml", repo / "metrics" / "cnn_gru.json"]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in untouched]

    # exactly as the README prints them, in a new shell that activated the environment
    (queue,) = readme_commands("dvc exp run --queue -S 'models.cnn_gru.dropout=")
    assert f"models.cnn_gru.dropout={','.join(QUEUED_DROPOUTS)}" in queue
    output = run_as_printed(queue, repo, env)
    names = re.findall(r"Queued experiment '([^']+)'", output)
    assert len(names) == 2, output
    (start,) = readme_commands("dvc queue start -j 2")
    run_as_printed(start, repo, env)
    wait_for_queue(repo, env, names)
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in untouched] == before

    shown = run_json(["dvc", "exp", "show", "--json"], repo, env)
    experiments = {
        e["name"]: e["revs"][0]["data"]
        for baseline in shown
        for e in baseline.get("experiments") or []
    }
    assert set(names) <= set(experiments), list(experiments)
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("handball-actions").experiment_id
    dropouts = set()
    for name in names:
        data = experiments[name]
        dropout = data["params"]["params.yaml"]["data"]["models"]["cnn_gru"]["dropout"]
        macro_f1 = data["metrics"]["metrics/cnn_gru.json"]["data"]["macro_f1"]
        dropouts.add(str(dropout))
        runs = client.search_runs([exp_id], filter_string=f"tags.dvc_exp_name = '{name}'")
        by_model = {r.data.tags["model"]: r for r in runs}
        assert set(by_model) == {"cnn_gru", "comparison"}, sorted(by_model)  # only what changed
        trained = by_model["cnn_gru"]
        assert trained.info.status == "FINISHED"
        assert trained.info.run_name == f"cnn_gru · sample · {name}"  # model, data, experiment
        assert trained.data.params["model.dropout"] == str(dropout)  # its own params.yaml
        assert trained.data.metrics["test_macro_f1"] == pytest.approx(macro_f1, abs=1e-4)
        assert trained.info.artifact_uri.startswith((repo / "mlruns").as_uri())
    assert dropouts == set(QUEUED_DROPOUTS)

    # the champion is the version with the best validation score registered on this data and
    # split, whichever experiment ended last
    versions = client.search_model_versions("name = 'handball-action-classifier-sample'")
    champion = client.get_model_version_by_alias("handball-action-classifier-sample", "champion")
    assert champion.tags["selected_by"] == "val_macro_f1"
    assert float(champion.tags["val_macro_f1"]) == max(
        float(v.tags["val_macro_f1"])
        for v in versions
        if v.tags.get("split_hash") == champion.tags["split_hash"]
    )


@pytest.mark.slow  # trains cnn_gru at a new point, then comes back; 171 s on busy cores; CI runs it
def test_a_stage_restored_from_the_run_cache_leaves_compare_complete(project):
    """Coming back to parameters trained before: `dvc exp run` moves cnn_gru to a dropout no
    other test uses (it trains), then back to the tiny default that the first `dvc repro`
    trained. DVC restores train@cnn_gru (model, reports, metrics) from its run cache instead
    of training; no new MLflow training run is logged, the restored reports point at the first
    repro's run, and compare still tables all three models, with cnn_gru's restored scores.
    Leaves the workspace at the first repro's parameters."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    env = state["env"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("handball-actions").experiment_id
    away = "models.cnn_gru.dropout=0.35"  # a value no other test runs
    moved = run(["dvc", "exp", "run", "-S", TINY[0], "-S", away], repo, env)
    assert "train@cnn_gru" in stages_run(moved), moved[-3000:]
    trained_before = client.search_runs([exp_id], filter_string="tags.model = 'cnn_gru'")

    # back to the default: the README's one-variation command with no variation
    output = run(["dvc", "exp", "run", "-S", TINY[0]], repo, env)
    assert "Stage 'train@cnn_gru' is cached - skipping run" in output, output[-3000:]
    assert stages_run(output) == {"check_params", "compare"}, output[-3000:]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    default = compose_params(TINY, conf_dir=repo / "conf")["models"]["cnn_gru"]["dropout"]
    assert params["models"]["cnn_gru"]["dropout"] == default
    assert len(client.search_runs([exp_id], filter_string="tags.model = 'cnn_gru'")) == len(
        trained_before
    )
    restored = logged_model(repo, "cnn_gru")
    assert restored["run_id"] == state["first_runs"]["cnn_gru"]
    first = client.get_run(restored["run_id"])
    table = pd.read_csv(repo / "reports" / "comparison.csv").set_index("model")
    assert sorted(table.index) == sorted(RANKED + BASELINES)
    assert table.loc["cnn_gru", "macro_f1"] == pytest.approx(
        first.data.metrics["test_macro_f1"], abs=1e-4
    )


@pytest.mark.slow  # ~40 s; CI runs it
def test_readme_one_variation_runs_as_printed_in_a_new_shell(project):
    """`dvc exp run -S models.cnn_gru.dropout=0.2` exactly as the README prints it, in a new
    shell after `source .venv/bin/activate`: DVC re-composes conf/ with the override and
    reruns only train@cnn_gru and compare, with the project's python."""
    repo, state = project
    (command,) = readme_commands("dvc exp run -S models.cnn_gru")
    output = run_as_printed(command, repo, state["env"])
    assert stages_run(output) == {"check_params", "train@cnn_gru", "compare"}, output[-3000:]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["models"]["cnn_gru"]["dropout"] == 0.2
    assert params["frames"]["num_frames"] == 6  # the copy's default: experiment=tiny


@pytest.mark.slow  # two `dvc exp run`s with the ensemble logged, ~50 s; CI runs it
def test_readme_fitted_ensemble_weights_rerun_only_compare(project):
    """`dvc exp run -S compare.ensemble.weights=fitted` as the README prints it: only compare
    reruns (the trained models' probabilities are reused), the weights lie on the 0.1 grid,
    and the ensemble row is still ranked by its (leave-one-out) validation score."""
    repo, state = project
    (command,) = readme_commands("dvc exp run -S compare.ensemble.weights")
    try:
        output = run_as_printed(command, repo, state["env"])
        assert stages_run(output) == {"check_params", "compare"}, output[-3000:]
        params = yaml.safe_load((repo / "params.yaml").read_text())
        (weights,) = json.loads(
            (repo / "reports" / "ensemble" / "weights.json").read_text()
        ).values()
        assert sorted(weights) == sorted(MODELS) and sum(weights.values()) == pytest.approx(1)
        assert all(round(w * 10, 6).is_integer() for w in weights.values()), weights
        table = pd.read_csv(repo / "reports" / "comparison.csv")
        val = f"val_{params['compare']['metric']}"
        assert list(table[val].iloc[:4]) == sorted(table[val].iloc[:4], reverse=True)
        assert "ensemble" in list(table["model"].iloc[:4])
    finally:  # the workspace back to the default weights for the tests after this one
        run(["dvc", "exp", "run", "-S", "compare.ensemble.weights=equal"], repo, state["env"])


def test_readme_bad_value_through_dvc_exp_run_is_refused_before_training(project):
    """`dvc exp run -S models.cnn3d.train.epochs=-5` as the README prints it: DVC composes
    it, train@cnn3d refuses it as it starts (the key, the value, what is allowed), nothing is
    trained and no MLflow run is opened."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("handball-actions").experiment_id
    runs_before = len(client.search_runs([experiment]))
    committed = (repo / "params.yaml").read_text()
    (command,) = readme_commands("dvc exp run -S models.cnn3d.train.epochs")
    try:
        proc = subprocess.run(
            ["bash", "-c", f"source .venv/bin/activate && {command}"],
            cwd=repo,
            env=new_shell_env(state["env"]),
            capture_output=True,
            text=True,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-3000:]
        assert "models.cnn3d.train.epochs=-5: must be a whole number >= 1" in output
        # the check stage refuses it first: no other stage starts, no output is removed
        assert stages_run(output) == {"check_params"} and "Epoch 1/" not in output
        assert (repo / "models" / "cnn3d" / "model.keras").is_file()
        assert len(client.search_runs([experiment])) == runs_before
    finally:  # the workspace as it was for the tests after this one
        (repo / "params.yaml").write_text(committed)
    assert json.loads(run(["dvc", "status", "--json", "dvc.yaml"], repo, state["env"])) == {}


def stages_dvc_would_rerun(project, override: str) -> set[str]:
    """The stages `dvc status` lists with `override` composed into the tiny params.yaml; the
    committed params.yaml is put back afterwards."""
    repo, state = project
    committed = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(
        dump_params(compose_params(TINY + [override], conf_dir=repo / "conf"))
    )
    try:
        return set(json.loads(run(["dvc", "status", "--json", "dvc.yaml"], repo, state["env"])))
    finally:
        (repo / "params.yaml").write_text(committed)


def test_one_cnn_gru_parameter_reruns_only_that_model_and_compare(project):
    change = "models.cnn_gru.dropout=0.25"  # a value no earlier test ran
    status = stages_dvc_would_rerun(project, change)
    assert status == {"check_params", "train@cnn_gru"}, status
    # `dvc exp run -S` doing the same for real: the queued-grid and run-cache tests above


def test_clean_min_frames_reruns_the_models_that_record_it(project):
    """A logged model refuses clips shorter than the `clean.min_frames` it was trained with,
    so changing it reruns every model even where no clip is quarantined differently (the
    tiny sample's clips all pass 5 and 6 frames alike, so clean's outputs would not change)."""
    status = stages_dvc_would_rerun(project, "clean.min_frames=5")
    assert {"clean", "train@frame_cnn", "train@cnn3d", "train@cnn_gru"} <= status, status


@pytest.mark.slow  # a whole (tiny) pipeline in DVC's temporary copy, ~2 min; CI runs it
def test_a_folder_of_class_folders_needs_no_class_list(project, tmp_path):
    """The README's `dvc exp run -S dataset=folder -S dataset.path=...` on a folder of three
    class folders, with no class list: the experiment runs every stage (in a temporary copy,
    `--temp`, so the workspace stays the sample's) and its models' classes are the folders'."""
    from conftest import write_numbered_video
    from mlflow.tracking import MlflowClient

    repo, state = project
    footage = tmp_path / "footage"
    for folder in ("pass", "shot", "block"):
        (footage / folder).mkdir(parents=True)
        for scene in range(6):
            write_numbered_video(footage / folder / f"{folder}_S{scene}_act1.avi", 10)
    (command,) = readme_commands("dvc exp run -S dataset=folder -S dataset.path=/footage")
    assert "dataset.classes" not in command
    command = command.replace("/footage/actions", str(footage))
    output = run_as_printed(f"{command} --temp", repo, state["env"])
    assert {"download", "clean", "frames", "compare"} <= stages_run(output), output[-3000:]
    name = re.findall(r"Ran experiment\(s\): (\S+)", output)[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("handball-actions").experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.dvc_exp_name = '{name}'")
    trained = [r for r in runs if r.data.tags.get("model") in MODELS]
    assert {r.data.tags["model"] for r in trained} == set(MODELS)
    assert {r.data.params["dataset.classes"] for r in trained} == {"block,pass,shot"}
    # `dataset.name` is null for a folder: runs and their dataset carry the folder's name
    assert {r.info.run_name for r in trained} == {f"{m} · footage · {name}" for m in MODELS}
    assert {r.inputs.dataset_inputs[0].dataset.name for r in trained} == {"footage"}


@pytest.mark.slow  # regenerates the sample and asks DVC three times, ~12 s; CI runs it
def test_data_dvc_points_at_the_regenerated_sample(project, tmp_path):
    """data.dvc is a real pointer: regenerating the sample reproduces its recorded content."""
    repo, state = project
    default = tmp_path / "default_params.yaml"
    # the sample as the committed default composes it (this copy defaults to tiny)
    default.write_text(dump_params(compose_params(["experiment=sample"], conf_dir=repo / "conf")))
    run(
        [
            sys.executable,
            "-m",
            "pipeline.stages.download",
            "--params",
            str(default),
            "--out",
            "data/source",
        ],
        repo,
        state["env"],
    )
    recorded = (repo / "data.dvc").read_text()
    run(["dvc", "commit", "-f", "data.dvc"], repo, state["env"])  # hashes the workspace copy
    assert (repo / "data.dvc").read_text() == recorded
    assert "up to date" in run(["dvc", "status", "data.dvc"], repo, state["env"]).lower()


@pytest.mark.slow  # `dvc repro download` and `dvc status` over replaced footage, ~13 s; CI runs it
def test_changed_footage_reruns_download_by_content(project, tmp_path):
    """`dataset=folder` on a folder outside the repository: DVC hashes the footage itself, so
    replacing one clip (same name, same params) reruns download, and then clean."""
    from conftest import write_numbered_video

    repo, state = project
    env = state["env"]
    footage = tmp_path / "footage"
    for label in ("shot", "passing"):
        (footage / label).mkdir(parents=True)
        for k in range(3):
            write_numbered_video(footage / label / f"{label}_S{k}_act1.avi", 10)
    committed = (repo / "params.yaml").read_text()
    lock = (repo / "dvc.lock").read_text()
    overrides = ["dataset=folder", f"dataset.path={footage}", "dataset.classes=[shot,passing]"]
    (repo / "params.yaml").write_text(
        dump_params(compose_params(TINY + overrides, conf_dir=repo / "conf"))
    )
    try:
        output = run(["dvc", "repro", "download"], repo, env)
        assert stages_run(output) == {"check_params", "download"}
        assert json.loads(run(["dvc", "status", "--json", "download"], repo, env)) == {}

        write_numbered_video(footage / "shot" / "shot_S1_act1.avi", 14)  # new content, same name
        status = json.loads(run(["dvc", "status", "--json", "download"], repo, env))
        changed = status["download"][0]["changed deps"]
        assert changed == {str(footage): "modified"}, status

        assert stages_run(run(["dvc", "repro", "download"], repo, env)) == {"download"}
        status = json.loads(run(["dvc", "status", "--json", "clean"], repo, env))
        assert "clean" in status, status  # the new raw data invalidates the next stage
    finally:  # back to the sample's raw data for the tests after this one
        (repo / "params.yaml").write_text(committed)
        (repo / "dvc.lock").write_text(lock)
        run(["dvc", "checkout", "download"], repo, env)
    assert json.loads(run(["dvc", "status", "--json", "download", "clean"], repo, env)) == {}


def hydra_multirun(repo: Path, env: dict, *overrides: str) -> str:
    """`python -m pipeline.sweep -m <overrides>` in the project."""
    return run([sys.executable, "-m", "pipeline.sweep", "-m", *overrides], repo, env)


def test_a_sweep_grid_that_breaks_the_schema_starts_no_job(project, tmp_path):
    """Every point of a sweep's grid is checked before the first job: a bad value stops the
    sweep with exit status 2 and the problem with its point; no job trains, no parent run."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("handball-actions").experiment_id
    before = len(client.search_runs([exp]))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "-m", "model=cnn_gru", TINY[0]]
        + ["model.dropout=0.1,abc", "model.train.batch_size=0"]
        + [f"hydra.sweep.dir={tmp_path / 'multirun'}"],  # the skipped jobs' folders
        cwd=repo,
        env=state["env"],
        capture_output=True,
        text=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "no job was started" in output and "Epoch 1/" not in output
    assert (
        "models.cnn_gru.dropout='abc': must be a number >= 0 and < 1 (at model.dropout=abc)"
        in output
    )
    assert "models.cnn_gru.train.batch_size=0: must be a whole number >= 1" in output
    assert len(client.search_runs([exp])) == before
    # a sweep over the model group: the group is not expanded up front, the rest still checked
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.sweep", "-m", "model=cnn3d,cnn_gru", TINY[0]]
        + ["model.train.epochs=0", f"hydra.sweep.dir={tmp_path / 'models'}"],
        cwd=repo,
        env=state["env"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "train.epochs=0: must be a whole number >= 1 (at every job)" in proc.stdout + proc.stderr
    assert len(client.search_runs([exp])) == before


@pytest.mark.slow  # two cnn_gru training jobs, ~37 s; CI runs it (make test-all)
def test_hydra_multirun_is_one_parent_run_with_a_child_per_job(project):
    """`python -m pipeline.sweep -m`: two jobs on the cached features, one MLflow parent with
    two finished children carrying their parameters and metrics, the best child named on
    the parent, outputs under multirun/ and the DVC outputs untouched."""
    import hashlib

    from mlflow.tracking import MlflowClient

    repo, state = project
    dvc_outputs = [repo / "metrics" / "cnn_gru.json", repo / "models" / "cnn_gru" / "model.keras"]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in dvc_outputs]
    output = hydra_multirun(repo, state["env"], "model=cnn_gru", TINY[0], "model.dropout=0.1,0.3")
    assert "Launching 2 jobs" in output
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in dvc_outputs] == before
    jobs = sorted((repo / "multirun").glob("*/*/[0-9]*"))
    assert len(jobs) == 2 and all((j / "metrics" / "cnn_gru.json").is_file() for j in jobs)
    assert "multirun" not in run(["git", "status", "--porcelain"], repo, state["env"])

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("handball-actions")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.model = 'sweep:cnn_gru'")
    assert len(parents) == 1
    parent = parents[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["model.dropout"] for c in children) == ["0.1", "0.3"]
    assert all(
        "eval_val_macro_f1" in c.data.metrics and "test_macro_f1" in c.data.metrics
        for c in children
    )
    best = max(children, key=lambda c: c.data.metrics["eval_val_macro_f1"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_child_run_id"] == best.info.run_id
    assert parent.data.metrics["jobs"] == 2 and parent.data.metrics["jobs_failed"] == 0


@pytest.mark.slow  # ~30 s more on top of the shared repro; CI runs it (make test-all)
def test_a_failed_sweep_job_is_recorded_and_the_others_run(project):
    from mlflow.tracking import MlflowClient

    repo, state = project
    # a failure the config schema cannot foresee: more frames than the cache holds
    output = hydra_multirun(
        repo, state["env"], "model=cnn_gru", TINY[0], "model.num_frames=50,null"
    )
    assert "num_frames=50 but the cache holds" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("handball-actions")
    parent = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.model = 'sweep:cnn_gru'",
        order_by=["start_time DESC"],
    )[0]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    assert parent.data.metrics["jobs_failed"] == 1


@pytest.mark.slow  # ~30 s more on top of the shared repro; CI runs it (make test-all)
def test_train_seeds_report_mean_and_std_with_a_nested_run_per_seed(project, tmp_path):
    """`train_seeds`: the model is trained again per extra seed (nested MLflow runs) and the
    metrics file gets mean and std over all seeds; compare shows them. Runs the real CLIs on
    the cached features of the repro above (cnn_gru is the quick one)."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    env = {**state["env"], "DVC_ROOT": str(repo)}
    # the stage CLIs below write the workspace outside DVC: kept and put back afterwards, so the
    # tests after this one (e.g. the S3 push) see the outputs dvc.lock names
    uncached = [*(repo / "metrics").glob("*.json"), *(repo / "reports").glob("comparison.*")]
    kept = {file: file.read_bytes() for file in uncached}  # `cache: false` outputs
    try:
        params = compose_params(TINY + ["train_seeds=[42,7,8]"], conf_dir=repo / "conf")
        path = tmp_path / "params.yaml"
        path.write_text(dump_params(params))
        run(
            [
                sys.executable,
                "-m",
                "pipeline.stages.train",
                "--model",
                "cnn_gru",
                "--params",
                str(path),
            ],
            repo,
            env,
        )
        metrics = json.loads((repo / "metrics" / "cnn_gru.json").read_text())
        assert metrics["seeds"] == 3
        assert 0 <= metrics["macro_f1_mean"] <= 1 and metrics["macro_f1_std"] >= 0

        client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
        parent = logged_model(repo, "cnn_gru")["run_id"]
        exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
        )
        assert sorted(r.data.params["seed"] for r in children) == ["7", "8"]
        assert all(
            r.info.status == "FINISHED" and "test_macro_f1" in r.data.metrics for r in children
        )
        scores = [client.get_run(parent).data.metrics["test_macro_f1"]] + [
            r.data.metrics["test_macro_f1"] for r in children
        ]
        assert metrics["macro_f1_mean"] == pytest.approx(sum(scores) / 3, abs=1e-3)

        run([sys.executable, "-m", "pipeline.stages.compare", "--params", str(path)], repo, env)
        table = pd.read_csv(repo / "reports" / "comparison.csv").set_index("model")
        assert table.loc["cnn_gru", "seeds"] == 3
        assert "± " in (repo / "reports" / "comparison.md").read_text()
    finally:
        for file, content in kept.items():
            file.write_bytes(content)
        run(["dvc", "checkout", "--force", "train@cnn_gru", "compare"], repo, env)
    status = run(["dvc", "status", "--json", "train@cnn_gru", "compare"], repo, env)
    assert json.loads(status) == {}, status


@pytest.mark.slow  # ~30 s more on top of the shared repro; CI runs it (make test-all)
def test_optuna_search_space_runs_as_one_parent_with_trials(project):
    """conf/hparams_search/cnn_gru_optuna.yaml through Hydra's Optuna sweeper (extra
    [optuna], installed with [dev]): two trials, one parent run naming the best."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from mlflow.tracking import MlflowClient

    repo, state = project
    output = hydra_multirun(
        repo, state["env"], "hparams_search=cnn_gru_optuna", TINY[0], "hydra.sweeper.n_trials=2"
    )
    assert "Best value" in output
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("handball-actions")
    parent = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.model = 'sweep:cnn_gru'",
        order_by=["start_time DESC"],
    )[0]
    assert "hparams_search=cnn_gru_optuna" in parent.data.tags["sweep_overrides"]
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and "best_child_run_id" in parent.data.tags
    dropouts = {c.data.params["model.dropout"] for c in children}
    assert len(dropouts) == 2  # the sampler drew different points
