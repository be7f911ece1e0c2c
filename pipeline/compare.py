"""Stage `compare`: one table of all models (DVC plot, Markdown, CSV, PNG, MLflow run).

Reads the per-model metrics files that the train stages write (or that DVC restores from its
run cache), so the table is complete even when no model was retrained.
"""

from __future__ import annotations

import io
import json
import logging

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common import (resolve, stage_cli, write_bytes_atomic,  # noqa: E402
                             write_text_atomic)

log = logging.getLogger(__name__)

COLUMNS = ["model", "accuracy", "balanced_accuracy", "macro_f1", "params", "train_time_s",
           "epochs", "test_clips"]
SCORES = ["accuracy", "balanced_accuracy", "macro_f1"]


def comparison_table(params: dict) -> pd.DataFrame:
    metrics_dir = resolve(params["paths"]["metrics"])
    rows = []
    for name in params["models"]:
        path = metrics_dir / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro train@{name}` first")
        rows.append({"model": name, **json.loads(path.read_text())})
    table = pd.DataFrame(rows)[COLUMNS]
    metric = params["compare"]["metric"]
    if metric not in SCORES:
        raise ValueError(f"compare.metric={metric!r}: one of {SCORES}")
    return table.sort_values(metric, ascending=False, kind="stable").reset_index(drop=True)


def comparison_figure(table: pd.DataFrame, num_classes: int):
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.axhline(1 / num_classes, color="grey", linestyle="--", linewidth=1,
               label=f"chance (balanced) 1/{num_classes}")
    width = 0.8 / len(SCORES)
    for i, score in enumerate(SCORES):
        ax.bar([x + i * width for x in range(len(table))], table[score], width, label=score)
    ax.set_xticks([x + width for x in range(len(table))], table["model"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    ax.set_title("Models on the test split")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def compare(params: dict) -> pd.DataFrame:
    import mlflow

    from pipeline.tracking import run_tags, use_experiment

    table = comparison_table(params)
    reports = resolve(params["paths"]["reports"])
    markdown = table.to_markdown(index=False, floatfmt=".3f")
    fig = comparison_figure(table, len(params["dataset"]["classes"]))
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    write_bytes_atomic(reports / "comparison.png", png.getvalue())
    write_text_atomic(reports / "comparison.md", markdown + "\n")
    write_text_atomic(reports / "comparison.csv", table.to_csv(index=False))
    best = table.iloc[0]

    use_experiment(params["mlflow"]["experiment"])
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    tags = {**run_tags("comparison", dataset["dataset_hash"]), "best_model": best["model"]}
    with mlflow.start_run(run_name="comparison", tags=tags):
        mlflow.log_table(table, "comparison.json")
        mlflow.log_text(markdown, "comparison.md")
        mlflow.log_figure(fig, "comparison.png")
        mlflow.log_metrics({f"{r['model']}_{s}": float(r[s])
                            for r in table.to_dict("records") for s in SCORES})
    log.info("compare: best by %s is %s (%.3f)\n%s", params["compare"]["metric"], best["model"],
             best[params["compare"]["metric"]], markdown)
    return table


def main(argv: list[str] | None = None) -> None:
    stage_cli("compare", __doc__.splitlines()[0], lambda p, a: compare(p), argv)


if __name__ == "__main__":
    main()
