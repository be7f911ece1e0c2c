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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common import (  # noqa: E402
    PipelineError,
    dataset_classes,
    resolve,
    stage_cli,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.evaluate import SCORES, bootstrap_intervals  # noqa: E402
from pipeline.serving.registry import (  # noqa: E402
    check_promote_policy,
    model_ref,
    register_champion,
)

log = logging.getLogger(__name__)


COSTS = ["params", "train_time_s", "inference_ms_per_clip", "epochs", "test_clips"]


# the `baseline` stage's classifiers and their rows' names
BASELINE_STAGE_ROWS = {"majority": "baseline_majority", "motion_logreg": "baseline_motion_logreg"}


def score_row(params: dict, name: str, metrics: dict, reports: Path, classes: list[str]) -> dict:
    """One row: test scores with bootstrap intervals (from the aligned test predictions in
    `reports`), validation scores, per-class F1, costs, and how many classes it predicts."""
    predictions = pd.read_csv(reports / "predictions.csv")
    index = {c: i for i, c in enumerate(classes)}
    cfg = params["compare"]
    intervals = bootstrap_intervals(
        predictions["actual"].map(index).to_numpy(),
        predictions["predicted"].map(index).to_numpy(),
        len(classes),
        int(cfg["bootstrap_samples"]),
        float(cfg["confidence"]),
        int(params["seed"]),
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


def model_row(params: dict, name: str, classes: list[str]) -> dict:
    """A trained model's row, from `metrics/<name>.json` and `reports/<name>/`."""
    metrics_path = resolve(params["paths"]["metrics"]) / f"{name}.json"
    reports = resolve(params["paths"]["reports"]) / name
    for path in (metrics_path, reports / "predictions.csv", reports / "per_class.csv"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro train@{name}` first")
    return {
        **score_row(params, name, json.loads(metrics_path.read_text()), reports, classes),
        "kind": "model",
    }


def baseline_rows(params: dict, classes: list[str]) -> list[dict]:
    """The rows of the `baseline` stage (majority class, motion logistic regression)."""
    path = resolve(params["paths"]["metrics"]) / "baseline.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro baseline` first")
    metrics = json.loads(path.read_text())
    reports = resolve(params["paths"]["reports"]) / "baseline"
    return [
        {**score_row(params, label, metrics[key], reports / key, classes), "kind": "baseline"}
        for key, label in BASELINE_STAGE_ROWS.items()
    ]


def selection_order(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Models by validation `metric` (then validation accuracy and balanced accuracy, which
    break the ties a small validation split makes common), best first; never by test."""
    keys = [f"val_{metric}"] + [f"val_{s}" for s in SCORES if s != metric]
    return table.sort_values(keys, ascending=False, kind="stable", na_position="last")


def comparison_table(params: dict) -> pd.DataFrame:
    """Models ranked by validation score, then the baseline rows; `flags` says which model
    does not beat the logistic regression baseline on test or predicts a single class."""
    classes = dataset_classes(params)
    metric = params["compare"]["metric"]
    if metric not in SCORES:
        raise PipelineError(f"compare.metric={metric!r}: one of {SCORES}")
    models = selection_order(
        pd.DataFrame([model_row(params, name, classes) for name in params["models"]]), metric
    )
    baselines = pd.DataFrame(baseline_rows(params, classes))
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


def json_safe(value):
    """NaN (a score a row does not have) as null: strict JSON parsers reject NaN."""
    return None if isinstance(value, float) and np.isnan(value) else value


def number(fmt: str):
    """A cell formatter that shows a missing value (a baseline's costs) as a dash."""
    return lambda v: "—" if pd.isna(v) else fmt.format(v)


def markdown_table(
    table: pd.DataFrame, classes: list[str], confidence: float, metric: str = "macro_f1"
) -> str:
    """Validation score (the ranking), test scores as `value [low, high]`, per-class F1,
    costs, flags."""
    shown = pd.DataFrame({"model": table["model"]})
    shown[f"val {metric} (ranks)"] = table[f"val_{metric}"].map(number("{:.3f}"))
    for score in SCORES:
        shown[f"{score} ({confidence:.0%} CI)"] = [
            f"{r[score]:.3f} [{r[score + '_low']:.2f}, {r[score + '_high']:.2f}]"
            for r in table.to_dict("records")
        ]
    if table["seeds"].notna().any():
        metric = "macro_f1"
        shown[f"{metric} over seeds"] = [
            f"{r[metric + '_mean']:.3f} ± {r[metric + '_std']:.3f} ({r['seeds']:.0f})"
            if pd.notna(r["seeds"])
            else ""
            for r in table.to_dict("records")
        ]
    for c in classes:
        shown[f"F1 {c}"] = table[f"f1_{c}"].map("{:.2f}".format)
    shown["params"] = table["params"].map(number("{:,.0f}"))
    shown["train s"] = table["train_time_s"].map(number("{:.0f}"))
    shown["ms/clip"] = table["inference_ms_per_clip"].map(number("{:.0f}"))
    shown["test clips"] = table["test_clips"]
    shown["flags"] = table["flags"]
    return shown.to_markdown(index=False, disable_numparse=True)


def comparison_figure(table: pd.DataFrame, classes: list[str], confidence: float):
    """Left: the three scores with their intervals and the chance line; right: F1 per class."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 3]})
    left.axhline(
        1 / len(classes),
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"chance (balanced) 1/{len(classes)}",
    )
    width = 0.8 / len(SCORES)
    x = np.arange(len(table))
    for i, score in enumerate(SCORES):
        err = np.vstack(
            [table[score] - table[f"{score}_low"], table[f"{score}_high"] - table[score]]
        )
        left.bar(x + i * width, table[score], width, yerr=err.clip(min=0), capsize=3, label=score)
    left.set_xticks(x + width, table["model"])
    left.set_ylim(0, 1)
    left.set_ylabel("test score")
    left.set_title(f"Test scores ({confidence:.0%} bootstrap intervals)")
    left.legend(loc="upper right", fontsize=7)
    width = 0.8 / len(table)
    cx = np.arange(len(classes))
    for i, row in enumerate(table.to_dict("records")):
        right.bar(cx + i * width, [row[f"f1_{c}"] for c in classes], width, label=row["model"])
    right.set_xticks(cx + width * (len(table) - 1) / 2, classes, rotation=30, ha="right")
    right.set_ylim(0, 1)
    right.set_title("F1 per class")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


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


def compare(params: dict) -> pd.DataFrame:
    import mlflow

    from pipeline.tracking import DESCRIPTION_TAG, run_name, run_tags, use_experiment

    classes = dataset_classes(params)
    confidence = float(params["compare"]["confidence"])
    check_promote_policy(params["compare"].get("promote", "better"))  # before any work
    table = comparison_table(params)
    reports = resolve(params["paths"]["reports"])
    metric = params["compare"]["metric"]
    markdown = markdown_table(table, classes, confidence, metric)
    fig = comparison_figure(table, classes, confidence)
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    write_bytes_atomic(reports / "comparison.png", png.getvalue())
    write_text_atomic(reports / "comparison.md", markdown + "\n")
    write_text_atomic(reports / "comparison.csv", table.to_csv(index=False))
    write_json_atomic(
        resolve(params["paths"]["metrics"]) / "comparison.json",
        {
            r["model"]: {k: json_safe(v) for k, v in r.items() if k != "model"}
            for r in table.round(4).to_dict("records")
        },
    )
    best = table.iloc[0].to_dict()  # the first model row: best by validation score

    use_experiment(params["mlflow"]["experiment"])
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    best_ref = model_ref(params, best["model"])
    tags = {
        **run_tags("comparison", dataset),
        "best_model": best["model"],
        # what `pipeline.predict` uses when no champion is registered
        "best_model_uri": best_ref.get("model_uri", ""),
    }
    with mlflow.start_run(run_name=run_name("comparison", dataset), tags=tags):
        mlflow.log_table(table, "comparison.json")
        mlflow.log_text(markdown, "comparison.md")
        mlflow.log_figure(fig, "comparison.png")
        mlflow.log_metrics(comparison_metrics(table, metric))
        mlflow.set_tag(DESCRIPTION_TAG, markdown)
        version = register_champion(params, best, best_ref, dataset)
        if version is not None:
            mlflow.set_tags({"champion": f"{params['compare']['register_as']}/{version.version}"})
    log.info(
        "compare: best by validation %s is %s (val %.3f; test %.3f, %.0f%% CI %.3f-%.3f)\n%s",
        metric,
        best["model"],
        best[f"val_{metric}"],
        best[metric],
        confidence * 100,
        best[f"{metric}_low"],
        best[f"{metric}_high"],
        markdown,
    )
    return table


def main(argv: list[str] | None = None) -> None:
    stage_cli("compare", __doc__.splitlines()[0], lambda p, a: compare(p), argv)


if __name__ == "__main__":
    main()
