"""What a train run writes and logs once a model is fitted and evaluated: the run's metrics,
`reports/<model>/` (the misclassified clips' gallery among them), the saved and logged model,
every seed's probabilities for the ensemble row, and the one-line summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pipeline.atomic import atomic_dir, write_json_atomic, write_text_atomic
from pipeline.config import resolve
from pipeline.data.arrays import load_arrays
from pipeline.probabilities import PROBABILITIES_FILE, probability_rows

if TYPE_CHECKING:
    from pipeline.schema.sections import Paths

SCORE_KEYS = ("accuracy", "balanced_accuracy", "macro_f1")
COST_KEYS = ("inference_ms_per_clip", "model_ms_per_clip", "backbone_ms_per_clip")


def log_run_metrics(summary: dict, scores: dict) -> None:
    import mlflow

    mlflow.log_metrics(
        {
            "num_params": summary["params"],
            "epochs_trained": summary["epochs"],
            "train_time_s": summary["train_time_s"],
            **{k: summary[k] for k in COST_KEYS},
        }
    )
    # apart from the headline scores (a section of their own in the UI's charts)
    mlflow.log_metrics({f"per_class/test_f1_{c}": s["f1"] for c, s in scores["per_class"].items()})


def write_reports(
    paths: Paths,
    gallery_clips: int,
    name: str,
    y_test,
    probs,
    classes: list,
    scores: dict,
    clips: dict,
    history,
) -> None:
    """`reports/<model>/` (a gallery of up to `gallery_clips` misclassified test clips among
    them, from their cached frames; the learning curves of the model's first network, one row
    per epoch), each an artifact of the run, and the test scores as `test_metrics.json`."""
    import mlflow

    from pipeline.evaluate import write_test_reports
    from pipeline.models.members import first_network_history

    frames_dir = resolve(paths.frames) / "test"
    test_frames = load_arrays(frames_dir, "frames", mmap_mode="r")[0]
    for path in write_test_reports(
        resolve(paths.reports) / name,
        name,
        y_test,
        probs,
        classes,
        scores["per_class"],
        clips["test"],
        first_network_history(history.history),
        test_frames,
        gallery_clips,
    ):
        mlflow.log_artifact(str(path))
    mlflow.log_dict(scores, "test_metrics.json")


def save_and_log_model(
    paths: Paths, name: str, model, preprocessing: dict, run_id: str, summary: dict
) -> None:
    """`models/<model>/model.keras`, and the MLflow model that classifies video files with
    this run's `preprocessing`, with its scores; `reports/<model>/mlflow.json` says where it
    lives (compare registers the champion from there)."""
    import mlflow

    from pipeline.serving.pyfunc import log_video_classifier

    model_dir = resolve(paths.models) / name
    with atomic_dir(model_dir) as tmp:
        model.save(tmp / "model.keras")
    info = log_video_classifier(model_dir / "model.keras", preprocessing, name)
    write_json_atomic(
        resolve(paths.reports) / name / "mlflow.json",
        {"run_id": run_id, "model_uri": info.model_uri},
    )
    # test and validation scores, of the run and of its logged model (the UI's Models tab
    # lists them side by side); `eval_val_*`, since Keras logs a per-epoch `val_accuracy`
    mlflow.log_metrics(
        {
            f"{prefix}{k}": summary[f"{key}{k}"]
            for prefix, key in (("test_", ""), ("eval_val_", "val_"))
            for k in SCORE_KEYS
        },
        model_id=info.model_id,
    )


def write_probabilities(reports: Path, probabilities: dict, clips: dict, classes: list) -> None:
    """Every seed's validation and test probabilities: what the ensemble row averages."""
    rows = [
        probability_rows(seed, split, clips[split], probs, classes)
        for (seed, split), probs in probabilities.items()
    ]
    write_text_atomic(reports / PROBABILITIES_FILE, pd.concat(rows).to_csv(index=False))


def summary_line(summary: dict, spread: dict) -> str:
    over_seeds = (
        f"; over {spread['seeds']} seeds macro-F1 {spread['macro_f1_mean']:.3f} ± "
        f"{spread['macro_f1_std']:.3f}"
        if spread
        else ""
    )
    return (
        f"test accuracy {summary['accuracy']:.3f}, balanced accuracy "
        f"{summary['balanced_accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f} after "
        f"{summary['epochs']} epochs ({summary['train_time_s']:.0f} s, {summary['params']} "
        f"params){over_seeds}"
    )
