"""Stage `compare`: the models side by side, and the best one registered as the champion.

Writes `reports/comparison.{md,csv,png}` and `metrics/comparison.json`: per model its
validation score, test accuracy, balanced accuracy and macro-F1 each with a bootstrap
confidence interval over the test clips (and mean ± std over `train_seeds` when set),
per-class F1, parameters, training time and inference time per clip; below the models, the
baseline rows (stage `baseline`), and a flag on every model that does not beat the logistic
regression baseline on test or predicts one class for every test clip. Logs them as an MLflow
`comparison` run.

Models are ranked, and the champion chosen, by the **validation** score
`val_<compare.metric>`; test scores are reported and never used to choose. The best model is
registered in the MLflow Model Registry as a version of `compare.register_as`, tagged with what
it takes to reproduce it (git commit, DVC experiment, dataset and split hashes, the full
composed config), and the alias `compare.alias` moves to it as `compare.promote` says (default:
only when its validation score beats the champion's on the same data and split).

Reads the files the train stages write (or that DVC restores from its run cache), so the
table is complete even when no model was retrained.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from pipeline.comparison_report import comparison_figure, json_safe, markdown_table
from pipeline.config import dataset_classes, resolve
from pipeline.ensemble import (
    ENSEMBLE,
    aligned_probabilities,
    ensemble_config,
    ensemble_summary,
    seed_ensembles,
    write_ensemble_reports,
)
from pipeline.errors import PipelineError
from pipeline.evaluate import SCORES, bootstrap_intervals
from pipeline.probabilities import read_probabilities
from pipeline.schema import Params
from pipeline.schema.base import MODEL_NAMES
from pipeline.schema.sections import Compare, Paths
from pipeline.serving.registry import model_ref, register_champion
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


COSTS = ["params", "train_time_s", "inference_ms_per_clip", "epochs", "test_clips"]


# the `baseline` stage's classifiers and their rows' names
BASELINE_STAGE_ROWS = {"majority": "baseline_majority", "motion_logreg": "baseline_motion_logreg"}


@dataclass(frozen=True)
class Scoring:
    """How every row is scored: the classes, `compare`'s intervals, the bootstrap's seed."""

    classes: list[str]
    compare: Compare
    seed: int


def score_row(scoring: Scoring, name: str, metrics: dict, reports: Path) -> dict:
    """One row: test scores with bootstrap intervals (from the aligned test predictions in
    `reports`), validation scores, per-class F1, costs, and how many classes it predicts."""
    classes = scoring.classes
    predictions = pd.read_csv(reports / "predictions.csv")
    index = {c: i for i, c in enumerate(classes)}
    intervals = bootstrap_intervals(
        predictions["actual"].map(index).to_numpy(),
        predictions["predicted"].map(index).to_numpy(),
        len(classes),
        scoring.compare.bootstrap_samples,
        scoring.compare.confidence,
        scoring.seed,
    )
    per_class = pd.read_csv(reports / "per_class.csv").set_index("class")["f1"]
    row = {"model": name}
    for score in SCORES:
        row[f"val_{score}"] = metrics.get(f"val_{score}", np.nan)
        row[score] = metrics[score]
        row[f"{score}_low"], row[f"{score}_high"] = intervals[score]
    row["predicted_classes"] = int(predictions["predicted"].nunique())
    row.update({f"f1_{c}": float(per_class.get(c, np.nan)) for c in classes})
    row.update({k: metrics.get(k, np.nan) for k in COSTS})
    # over `train_seeds`, when the model was trained more than once
    row.update(
        {
            k: metrics.get(k, np.nan)
            for k in [f"{s}_{m}" for s in SCORES for m in ("mean", "std")] + ["seeds"]
        }
    )
    return row


def model_row(scoring: Scoring, paths: Paths, name: str) -> dict:
    """A trained model's row, from `metrics/<name>.json` and `reports/<name>/`."""
    metrics_path = resolve(paths.metrics) / f"{name}.json"
    reports = resolve(paths.reports) / name
    for path in (metrics_path, reports / "predictions.csv", reports / "per_class.csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro train@{name}` first")
    return {
        **score_row(scoring, name, json.loads(metrics_path.read_text()), reports),
        "kind": "model",
    }


def ensemble_rows(scoring: Scoring, reports_dir: str, model_rows: list[dict]) -> list[dict]:
    """The ensemble's row (none with fewer than two members): its members' validation and
    test probabilities averaged per seed (`compare.ensemble`), scored like a model's, its
    costs the sum of its members' (`model_rows`); its reports in `reports/ensemble/`."""
    classes = scoring.classes
    config = ensemble_config(scoring.compare.ensemble)
    if len(config.members) < 2:
        return []
    reports = resolve(reports_dir)
    clips, probs = aligned_probabilities(
        {m: read_probabilities(reports, m) for m in config.members}, classes
    )
    ensembles = seed_ensembles(clips, probs, classes, config)
    # the seed the saved models were trained with: what the logged ensemble model serves
    main = next((e for e in ensembles if e.seed == scoring.seed), ensembles[0])
    write_ensemble_reports(reports / ENSEMBLE, ensembles, main, classes)
    members = {r["model"]: r for r in model_rows if r["model"] in config.members}
    summary = ensemble_summary(ensembles, main, members)
    row = score_row(scoring, ENSEMBLE, summary, reports / ENSEMBLE)
    weights = json.dumps(main.weights)
    return [{**row, "kind": "ensemble", "weights": weights, "pooling": config.pooling}]


def baseline_rows(scoring: Scoring, paths: Paths) -> list[dict]:
    """The rows of the `baseline` stage (majority class, motion logistic regression)."""
    path = resolve(paths.metrics) / "baseline.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro baseline` first")
    metrics = json.loads(path.read_text())
    reports = resolve(paths.reports) / "baseline"
    return [
        {**score_row(scoring, label, metrics[key], reports / key), "kind": "baseline"}
        for key, label in BASELINE_STAGE_ROWS.items()
    ]


def selection_order(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Models by validation `metric` (then validation accuracy and balanced accuracy, which
    break the ties a small validation split makes common), best first; never by test."""
    keys = [f"val_{metric}"] + [f"val_{s}" for s in SCORES if s != metric]
    return table.sort_values(keys, ascending=False, kind="stable", na_position="last")


def comparison_table(scoring: Scoring, paths: Paths) -> pd.DataFrame:
    """Models and their ensemble ranked by validation score (a tie goes to the single
    model), then the baseline rows; `flags` says which does not beat the logistic regression
    baseline on test or predicts a single class."""
    metric = scoring.compare.metric
    rows = [model_row(scoring, paths, name) for name in MODEL_NAMES]
    models = selection_order(
        pd.DataFrame(rows + ensemble_rows(scoring, paths.reports, rows)), metric
    )
    baselines = pd.DataFrame(baseline_rows(scoring, paths))
    bar = float(
        baselines.loc[baselines["model"] == BASELINE_STAGE_ROWS["motion_logreg"], metric].iloc[0]
    )
    models["flags"] = [
        ", ".join(
            f
            for f, on in (
                ("predicts one class", r["predicted_classes"] <= 1),
                (
                    f"does not beat the baseline ({metric} {r[metric]:.3f} <= {bar:.3f})",
                    r[metric] <= bar,
                ),
            )
            if on
        )
        for r in models.to_dict("records")
    ]
    baselines["flags"] = ""
    return pd.concat([models, baselines], ignore_index=True)


def comparison_metrics(table: pd.DataFrame, metric: str) -> dict[str, float]:
    """The comparison run's metrics: for every model and baseline row, the test score by
    `compare.metric` with its interval and the validation score, named
    `comparison/<row>_test_<metric>[_low|_high]` and `comparison/<row>_val_<metric>`, so the
    UI charts them in one section of their own, apart from the model runs' metrics. The full
    table (every score, per-class F1, costs) is the run's artifact `comparison.json`."""
    names = {
        metric: f"test_{metric}",
        f"{metric}_low": f"test_{metric}_low",
        f"{metric}_high": f"test_{metric}_high",
        f"val_{metric}": f"val_{metric}",
    }
    return {
        f"comparison/{row['model']}_{name}": float(row[column])
        for row in table.to_dict("records")
        for column, name in names.items()
        if pd.notna(row[column])
    }


def write_comparison_files(scoring: Scoring, paths: Paths, table: pd.DataFrame):
    """reports/comparison.{png,md,csv} and metrics/comparison.json; returns (markdown, figure)."""
    reports = resolve(paths.reports)
    classes, confidence = scoring.classes, scoring.compare.confidence
    markdown = markdown_table(table, classes, confidence, scoring.compare.metric)
    fig = comparison_figure(table, classes, confidence)
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    write_bytes_atomic(reports / "comparison.png", png.getvalue())
    write_text_atomic(reports / "comparison.md", markdown + "\n")
    write_text_atomic(reports / "comparison.csv", table.to_csv(index=False))
    write_json_atomic(
        resolve(paths.metrics) / "comparison.json",
        {
            r["model"]: {k: json_safe(v) for k, v in r.items() if k != "model"}
            for r in table.round(4).to_dict("records")
        },
    )
    return markdown, fig


def log_ensemble_model(reports: str, table: pd.DataFrame, classes: list[str], run_id: str) -> dict:
    """Log the ensemble row's model (its members' logged models, weights and pooling) in the
    comparison run `run_id`: a reference like `model_ref`'s, or {} when there is no ensemble
    row or a member's logged model is not in this MLflow store (logged)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.serving.ensemble import log_ensemble_classifier

    rows = table[table["kind"] == "ensemble"]
    if rows.empty:
        return {}
    weights, pooling = json.loads(rows.iloc[0]["weights"]), rows.iloc[0]["pooling"]
    uris = {m: model_ref(reports, m).get("model_uri") for m in weights}
    try:
        if not all(uris.values()):
            raise PipelineError(f"no logged model of {[m for m, u in uris.items() if not u]}")
        info = log_ensemble_classifier(uris, weights, pooling, classes, ENSEMBLE)
    except (MlflowException, PipelineError, OSError) as exc:
        log.warning(
            "not logging the ensemble's model: a member's logged model is not in %s (%s); "
            "retrain the members with `dvc repro -f train@<model>`",
            mlflow.get_tracking_uri(),
            exc,
        )
        return {}
    return {"run_id": run_id, "model_uri": info.model_uri}


def compare(config: Params) -> pd.DataFrame:
    """Rank the models and their ensemble by validation score next to the baseline rows,
    write the comparison files, log the `comparison` run and register the champion."""
    import mlflow

    from pipeline.tracking import DESCRIPTION_TAG, run_name, run_tags, use_experiment

    cfg, paths = config.compare, config.paths
    classes = dataset_classes(config.dataset.classes, paths.clean)
    scoring = Scoring(classes, cfg, config.seed)
    table = comparison_table(scoring, paths)
    markdown, fig = write_comparison_files(scoring, paths, table)
    best = table.iloc[0].to_dict()  # the first model row: best by validation score

    use_experiment(config.mlflow.experiment)
    dataset = json.loads((resolve(paths.clean) / "dataset.json").read_text())
    tags = {**run_tags("comparison", dataset), "best_model": best["model"]}
    with mlflow.start_run(run_name=run_name("comparison", dataset), tags=tags) as run:
        # the composed config: a registered ensemble's version points here
        mlflow.log_dict(config.composed, "config.yaml")
        mlflow.log_table(table, "comparison.json")
        mlflow.log_text(markdown, "comparison.md")
        mlflow.log_figure(fig, "comparison.png")
        mlflow.log_metrics(comparison_metrics(table, cfg.metric))
        mlflow.set_tag(DESCRIPTION_TAG, markdown)
        ensemble_ref = log_ensemble_model(paths.reports, table, classes, run.info.run_id)
        if ensemble_ref:  # beside its reports, as a trained model's (`model_ref`)
            write_json_atomic(resolve(paths.reports) / ENSEMBLE / "mlflow.json", ensemble_ref)
        best_ref = model_ref(paths.reports, best["model"])
        # what `pipeline.predict` uses when no champion is registered
        mlflow.set_tag("best_model_uri", best_ref.get("model_uri", ""))
        version = register_champion(cfg, best, best_ref, dataset)
        if version is not None:
            mlflow.set_tags({"champion": f"{version.name}/{version.version}"})
    log.info(
        "compare: best by validation %s is %s (val %.3f; test %.3f, %.0f%% CI %.3f-%.3f)\n%s",
        cfg.metric,
        best["model"],
        best[f"val_{cfg.metric}"],
        best[cfg.metric],
        cfg.confidence * 100,
        best[f"{cfg.metric}_low"],
        best[f"{cfg.metric}_high"],
        markdown,
    )
    return table


def main(argv: list[str] | None = None) -> None:
    stage_cli("compare", __doc__.splitlines()[0], lambda p, a: compare(p), argv)


if __name__ == "__main__":
    main()
