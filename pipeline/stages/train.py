"""Stage `train@<model>`: train one model on the cached arrays, evaluate it on the test split.

    python -m pipeline.stages.train --model cnn_gru                 # the DVC stage
    python -m pipeline.sweep -m model=cnn_gru model.dropout=0.1,0.3  # a sweep (pipeline/sweep.py)

Writes `models/<model>/model.keras`, `metrics/<model>.json` (for `dvc metrics show`) and
`reports/<model>/` (confusion matrix PNG, classification report, per-class scores, test
predictions, learning curves, the misclassified test clips, every seed's validation and test
probabilities for the ensemble row), and logs one MLflow run with all of it plus the model.
"""

from __future__ import annotations

import json
import logging

import pandas as pd

from pipeline.atomic import atomic_dir, write_json_atomic, write_text_atomic
from pipeline.config import resolve
from pipeline.data.arrays import (
    evaluation_views,
    fixed_inputs,
    input_dir,
    load_arrays,
    load_cache,
)
from pipeline.ensemble import PROBABILITIES_FILE, probability_rows
from pipeline.models.distributed import is_chief, training_strategy
from pipeline.models.evaluation import backbone_ms_per_clip, clip_probabilities, model_ms_per_clip
from pipeline.models.fitting import fit_model
from pipeline.stages.cli import stage_cli
from pipeline.stages.train_seeds import repeat_over_seeds, train_as_worker

log = logging.getLogger(__name__)


def train_and_evaluate(
    params: dict, name: str, parent_run_id: str | None = None, extra_tags: dict | None = None
) -> dict:
    """Train model `name`, evaluate it on validation and test, write its outputs under
    `paths.*`, log one MLflow run (a child of `parent_run_id` in a sweep) and return the
    summary that goes to `metrics/<name>.json`: load -> fit -> evaluate -> write reports and
    the model -> repeat over the other seeds -> summary."""
    import mlflow

    from pipeline.tracking import (
        DESCRIPTION_TAG,
        run_description,
        run_name,
        run_tags,
        use_experiment,
    )

    # first: a multi-worker cluster sets up TensorFlow's collectives before anything runs
    training_strategy(params)
    if name not in params["models"]:
        raise ValueError(f"no config for model {name!r} under models: {sorted(params['models'])}")
    cfg = params["models"][name]
    classes = json.loads((input_dir(params, cfg) / "classes.json").read_text())
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    data, clips = load_data(params, cfg)
    if not is_chief(params):
        return train_as_worker(params, name, data, len(classes))

    use_experiment(params["mlflow"]["experiment"])
    reports = resolve(params["paths"]["reports"]) / name
    seed = int(params["seed"])
    tags = {**run_tags(name, dataset), **(extra_tags or {})}
    with mlflow.start_run(
        run_name=run_name(name, dataset),
        tags=tags,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
    ) as run:
        log_run_inputs(params, cfg, dataset, classes, len(data["train"][1]))
        model, history, train_time = fit_model(params, name, data, len(classes), seed)
        probabilities, scores, summary = evaluate(params, cfg, model, data, classes, seed)
        summary.update(train_time_s=round(train_time, 2), epochs=len(history.history["loss"]))
        log_run_metrics(summary, scores)
        test_probs = probabilities[seed, "test"]
        write_reports(params, name, data["test"][1], test_probs, classes, scores, clips, history)
        save_and_log_model(params, name, model, classes, run.info.run_id, summary)
        spread = repeat_over_seeds(
            params, name, data, classes, summary, tags, run_name(name, dataset), probabilities
        )
        write_probabilities(reports, probabilities, clips, classes)
        if spread:
            summary.update({k: round(v, 4) for k, v in spread.items()})
            mlflow.log_metrics({f"test_{k}": v for k, v in spread.items() if k != "seeds"})
            mlflow.log_metric("seeds", spread["seeds"])
        mlflow.set_tag(DESCRIPTION_TAG, run_description(name, dataset, params, summary))
    write_json_atomic(resolve(params["paths"]["metrics"]) / f"{name}.json", summary)
    log.info("%s: %s", name, summary_line(summary, spread))
    return summary


def load_data(params: dict, cfg: dict) -> tuple[dict, dict]:
    """The model's inputs and labels per split (its fixed frames of each clip, trained and
    validated on), the views of the evaluation (`tta_views`), every cached training frame
    for `train.temporal_jitter`, and the validation and test clips' table."""
    caches = {split: load_cache(params, cfg, split) for split in ("train", "val", "test")}
    if not len(caches["val"][1]) or not len(caches["test"][1]):
        raise ValueError(
            "the validation or test split is empty: the dataset needs more "
            "recording groups per class (see the clean stage's warnings)"
        )
    data = {s: (fixed_inputs(cache, cfg), labels) for s, (cache, labels, _) in caches.items()}
    # without `tta_views` the one view is the fixed frames already selected: not a second copy
    data["views"] = {
        s: evaluation_views(caches[s][0], cfg) if cfg.get("tta_views") else [data[s][0]]
        for s in ("val", "test")
    }
    if cfg["train"].get("temporal_jitter"):
        data["train_cache"] = caches["train"][0]
    return data, {s: caches[s][2] for s in ("val", "test")}


def log_run_inputs(params: dict, cfg: dict, dataset: dict, classes: list, train_clips: int):
    """The run's params (the model's section, frames, features, seeds, the dataset), its
    composed config as `config.yaml` and its training data."""
    import mlflow

    from pipeline.tracking import flatten, log_dataset

    described = {"name": dataset["name"], "split_source": dataset.get("split_source")}
    inputs = {
        "model": cfg,
        "frames": params["frames"],
        "features": params["features"],
        "seed": params["seed"],
        "train_seeds": params.get("train_seeds"),
        "dataset": {**described, "classes": ",".join(classes)},  # in class-index order
    }
    mlflow.log_params(flatten(inputs))
    if cfg["train"].get("oversample"):
        mlflow.log_params(flatten({"augment": params["augment"]}))
    mlflow.log_dict(params, "config.yaml")  # the composed config this run trained with
    log_dataset(params, dataset, train_clips, resolve(params["paths"]["clean"]))


def evaluate(params: dict, cfg: dict, model, data: dict, classes: list, seed: int):
    """(probabilities per (seed, split), test scores, summary): the model's validation and
    test probabilities in stored order (averaged over views and mirror images where the
    config says), their scores and what a clip costs at inference on this machine."""
    from pipeline.evaluate import classification_metrics

    batch_size, hflip = int(cfg["train"]["batch_size"]), cfg.get("tta_hflip")
    probabilities = {
        (seed, split): clip_probabilities(model, views, batch_size, hflip)
        for split, views in data["views"].items()
    }
    scores, val_scores = (
        classification_metrics(data[s][1], probabilities[seed, s].argmax(axis=1), classes)
        for s in ("test", "val")
    )
    model_ms = model_ms_per_clip(model, data["views"]["test"], batch_size, hflip)
    x_test = data["test"][0]
    streams = 2 if params["features"].get("motion") else 1  # appearance (+ motion)
    backbone_ms = (
        backbone_ms_per_clip(
            params["features"]["backbone"],
            int(params["frames"]["size"]),
            x_test["features"].shape[1] * streams,
        )
        if isinstance(x_test, dict)
        else 0.0
    )
    summary = {
        **{k: scores[k] for k in SCORE_KEYS},
        "params": int(model.count_params()),
        "test_clips": int(len(data["test"][1])),
        **{f"val_{k}": val_scores[k] for k in SCORE_KEYS},
        # per clip on this machine, from cached frames; cnn_gru adds its feature backbone
        "inference_ms_per_clip": round(model_ms + backbone_ms, 2),
        "model_ms_per_clip": round(model_ms, 2),
        "backbone_ms_per_clip": round(backbone_ms, 2),
    }
    return probabilities, scores, summary


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
    params: dict, name: str, y_test, probs, classes: list, scores: dict, clips: dict, history
) -> None:
    """`reports/<model>/` (a gallery of the misclassified test clips among them, from their
    cached frames), each an artifact of the run, and the test scores as `test_metrics.json`."""
    import mlflow

    from pipeline.evaluate import write_test_reports

    frames_dir = resolve(params["paths"]["frames"]) / "test"
    test_frames = load_arrays(frames_dir, "frames", mmap_mode="r")[0]
    for path in write_test_reports(
        resolve(params["paths"]["reports"]) / name,
        name,
        y_test,
        probs,
        classes,
        scores["per_class"],
        clips["test"],
        history.history,
        test_frames,
        int(params["gallery"]["max_clips"]),
    ):
        mlflow.log_artifact(str(path))
    mlflow.log_dict(scores, "test_metrics.json")


def save_and_log_model(
    params: dict, name: str, model, classes: list, run_id: str, summary: dict
) -> None:
    """`models/<model>/model.keras`, and the MLflow model that classifies video files with
    this run's preprocessing, with its scores; `reports/<model>/mlflow.json` says where it
    lives (compare registers the champion from there)."""
    import mlflow

    from pipeline.serving.classifier import preprocessing_config
    from pipeline.serving.pyfunc import log_video_classifier

    model_dir = resolve(params["paths"]["models"]) / name
    with atomic_dir(model_dir) as tmp:
        model.save(tmp / "model.keras")
    info = log_video_classifier(
        model_dir / "model.keras", preprocessing_config(params, name, classes), name
    )
    write_json_atomic(
        resolve(params["paths"]["reports"]) / name / "mlflow.json",
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


def write_probabilities(reports, probabilities: dict, clips: dict, classes: list) -> None:
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


def main(argv: list[str] | None = None) -> None:
    def model_option(parser):
        parser.add_argument("--model", required=True, help="frame_cnn | cnn3d | cnn_gru")

    stage_cli(
        "train",
        __doc__.splitlines()[0],
        lambda p, a: train_and_evaluate(p.composed, a.model),
        argv,
        model_option,
    )


if __name__ == "__main__":
    main()
