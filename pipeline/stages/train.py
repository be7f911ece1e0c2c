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
from pipeline.models.distributed import is_chief, training_strategy, worker_index
from pipeline.models.evaluation import backbone_ms_per_clip, clip_probabilities, model_ms_per_clip
from pipeline.models.fitting import fit_model
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


def extra_seeds(params: dict) -> list[int]:
    """The seeds of `train_seeds` other than `seed`, in order."""
    return [int(s) for s in params.get("train_seeds") or [] if int(s) != int(params["seed"])]


def train_as_worker(params: dict, name: str, data: dict, num_classes: int) -> dict:
    """A `multi_worker` worker other than the chief: trains in step with the chief (the same
    seeds in the same order) and writes nothing, neither files nor MLflow runs."""
    import keras

    for i, seed in enumerate([int(params["seed"]), *extra_seeds(params)]):
        if i:
            keras.backend.clear_session()
        fit_model(params, name, data, num_classes, seed)
    log.info("%s: trained as worker %d; the chief writes the outputs", name, worker_index())
    return {}


def repeat_over_seeds(
    params: dict,
    name: str,
    data: dict,
    classes: list[str],
    first: dict,
    tags: dict,
    title: str,
    probabilities: dict,
) -> dict:
    """Train again with every seed of `train_seeds` other than `seed`, each as a nested MLflow
    run (`<title> · seed N`), add each seed's validation and test probabilities to
    `probabilities` ((seed, split) -> clips x classes) and return mean and standard deviation
    of the test scores over all seeds."""
    import keras
    import mlflow

    from pipeline.evaluate import classification_metrics, seed_spread

    seeds = extra_seeds(params)
    if not seeds:
        return {}
    y_test = data["test"][1]
    batch_size = int(params["models"][name]["train"]["batch_size"])
    rows = [{k: first[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}]
    for seed in seeds:
        keras.backend.clear_session()
        with mlflow.start_run(
            run_name=f"{title} · seed {seed}", nested=True, tags={**tags, "seed": str(seed)}
        ):
            mlflow.log_param("seed", seed)
            model, _, _ = fit_model(params, name, data, len(classes), seed)
            for split in ("val", "test"):
                probabilities[seed, split] = clip_probabilities(
                    model, data["views"][split], batch_size, params["models"][name].get("tta_hflip")
                )
            y_pred = probabilities[seed, "test"].argmax(axis=1)
            scores = classification_metrics(y_test, y_pred, classes)
            rows.append({k: scores[k] for k in rows[0]})
            mlflow.log_metrics({f"test_{k}": v for k, v in rows[-1].items()})
        log.info("%s seed %d: test macro-F1 %.3f", name, seed, rows[-1]["macro_f1"])
    return seed_spread(rows)


def train_and_evaluate(
    params: dict, name: str, parent_run_id: str | None = None, extra_tags: dict | None = None
) -> dict:
    """Train model `name`, evaluate it on validation and test, write its outputs under
    `paths.*`, log one MLflow run (a child of `parent_run_id` in a sweep) and return the
    summary that goes to `metrics/<name>.json`."""
    import mlflow

    from pipeline.evaluate import classification_metrics, write_test_reports
    from pipeline.serving.classifier import preprocessing_config
    from pipeline.serving.pyfunc import log_video_classifier
    from pipeline.tracking import (
        DESCRIPTION_TAG,
        flatten,
        log_dataset,
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
    train_cfg = cfg["train"]
    classes = json.loads((input_dir(params, cfg) / "classes.json").read_text())
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    caches = {split: load_cache(params, cfg, split) for split in ("train", "val", "test")}
    (_, y_train, _), (_, y_val, val_clips), (_, y_test, test_clips) = caches.values()
    if len(y_val) == 0 or len(y_test) == 0:
        raise ValueError(
            "the validation or test split is empty: the dataset needs more "
            "recording groups per class (see the clean stage's warnings)"
        )
    # the model's fixed frames of each clip (trained and validated on), the views of the
    # evaluation (`tta_views`) and, for `train.temporal_jitter`, every cached training frame
    data = {s: (fixed_inputs(cache, cfg), labels) for s, (cache, labels, _) in caches.items()}
    data["views"] = {s: evaluation_views(caches[s][0], cfg) for s in ("val", "test")}
    if train_cfg.get("temporal_jitter"):
        data["train_cache"] = caches["train"][0]
    del caches
    x_test = data["test"][0]
    if not is_chief(params):
        return train_as_worker(params, name, data, len(classes))

    use_experiment(params["mlflow"]["experiment"])
    reports = resolve(params["paths"]["reports"]) / name
    tags = {**run_tags(name, dataset), **(extra_tags or {})}
    with mlflow.start_run(
        run_name=run_name(name, dataset),
        tags=tags,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
    ) as run:
        mlflow.log_params(
            flatten(
                {
                    "model": cfg,
                    "frames": params["frames"],
                    "features": params["features"],
                    "seed": params["seed"],
                    "train_seeds": params.get("train_seeds"),
                    "dataset": {
                        "name": dataset["name"],
                        "split_source": dataset.get("split_source"),
                        "classes": ",".join(classes),  # in class-index order
                    },
                }
            )
        )
        if train_cfg.get("oversample"):
            mlflow.log_params(flatten({"augment": params["augment"]}))
        mlflow.log_dict(params, "config.yaml")  # the composed config this run trained with
        log_dataset(params, dataset, len(y_train), resolve(params["paths"]["clean"]))
        model, history, train_time = fit_model(
            params, name, data, len(classes), int(params["seed"])
        )

        # Predict in stored order; labels are read from the same arrays, so pairs stay aligned.
        seed, batch_size = int(params["seed"]), int(train_cfg["batch_size"])
        probabilities = {  # averaged over views (`tta_views`) and mirror images (`tta_hflip`)
            (seed, split): clip_probabilities(model, views, batch_size, cfg.get("tta_hflip"))
            for split, views in data["views"].items()
        }
        probs = probabilities[seed, "test"]
        scores = classification_metrics(y_test, probs.argmax(axis=1), classes)
        # validation scores of the final (restored best) weights: what sweeps select on
        val_pred = probabilities[seed, "val"].argmax(axis=1)
        val_scores = classification_metrics(y_val, val_pred, classes)
        model_ms = model_ms_per_clip(model, data["views"]["test"], batch_size, cfg.get("tta_hflip"))
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
            "accuracy": scores["accuracy"],
            "balanced_accuracy": scores["balanced_accuracy"],
            "macro_f1": scores["macro_f1"],
            "params": int(model.count_params()),
            "train_time_s": round(train_time, 2),
            "epochs": len(history.history["loss"]),
            "test_clips": int(len(y_test)),
            **{f"val_{k}": val_scores[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
            # per clip on this machine, from cached frames; cnn_gru adds its feature backbone
            "inference_ms_per_clip": round(model_ms + backbone_ms, 2),
            "model_ms_per_clip": round(model_ms, 2),
            "backbone_ms_per_clip": round(backbone_ms, 2),
        }
        mlflow.log_metrics(
            {
                "num_params": summary["params"],
                "epochs_trained": summary["epochs"],
                "train_time_s": summary["train_time_s"],
                **{
                    k: summary[k]
                    for k in ("inference_ms_per_clip", "model_ms_per_clip", "backbone_ms_per_clip")
                },
            }
        )
        # apart from the headline scores (a section of their own in the UI's charts)
        mlflow.log_metrics(
            {f"per_class/test_f1_{c}": s["f1"] for c, s in scores["per_class"].items()}
        )

        # the reports, a gallery of the misclassified test clips among them (their frames)
        test_frames = load_arrays(
            resolve(params["paths"]["frames"]) / "test", "frames", mmap_mode="r"
        )[0]
        for path in write_test_reports(
            reports,
            name,
            y_test,
            probs,
            classes,
            scores["per_class"],
            test_clips,
            history.history,
            test_frames,
            int(params["gallery"]["max_clips"]),
        ):
            mlflow.log_artifact(str(path))
        mlflow.log_dict(scores, "test_metrics.json")

        model_dir = resolve(params["paths"]["models"]) / name
        with atomic_dir(model_dir) as tmp:
            model.save(tmp / "model.keras")
        # the MLflow model classifies video files: it carries this run's preprocessing
        info = log_video_classifier(
            model_dir / "model.keras", preprocessing_config(params, name, classes), name
        )
        # where this model lives in the local MLflow store (compare registers the champion)
        write_json_atomic(
            reports / "mlflow.json", {"run_id": run.info.run_id, "model_uri": info.model_uri}
        )
        # test and validation scores, of the run and of its logged model (the UI's Models tab
        # lists them side by side); `eval_val_*`, since Keras logs a per-epoch `val_accuracy`
        mlflow.log_metrics(
            {
                f"{prefix}{k}": summary[f"{key}{k}"]
                for prefix, key in (("test_", ""), ("eval_val_", "val_"))
                for k in ("accuracy", "balanced_accuracy", "macro_f1")
            },
            model_id=info.model_id,
        )
        spread = repeat_over_seeds(
            params, name, data, classes, summary, tags, run_name(name, dataset), probabilities
        )
        # every seed's validation and test probabilities: what the ensemble row averages
        clips = {"val": val_clips, "test": test_clips}
        write_text_atomic(
            reports / PROBABILITIES_FILE,
            pd.concat(
                [
                    probability_rows(s, sp, clips[sp], p, classes)
                    for (s, sp), p in probabilities.items()
                ]
            ).to_csv(index=False),
        )
        if spread:
            summary.update({k: round(v, 4) for k, v in spread.items()})
            mlflow.log_metrics({f"test_{k}": v for k, v in spread.items() if k != "seeds"})
            mlflow.log_metric("seeds", spread["seeds"])
        mlflow.set_tag(DESCRIPTION_TAG, run_description(name, dataset, params, summary))
    write_json_atomic(resolve(params["paths"]["metrics"]) / f"{name}.json", summary)
    log.info(
        "%s: test accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f after %d epochs "
        "(%.0f s, %d params)%s",
        name,
        summary["accuracy"],
        summary["balanced_accuracy"],
        summary["macro_f1"],
        summary["epochs"],
        train_time,
        summary["params"],
        f"; over {spread['seeds']} seeds macro-F1 {spread['macro_f1_mean']:.3f} ± "
        f"{spread['macro_f1_std']:.3f}"
        if spread
        else "",
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    def model_option(parser):
        parser.add_argument("--model", required=True, help="frame_cnn | cnn3d | cnn_gru")

    stage_cli(
        "train",
        __doc__.splitlines()[0],
        lambda p, a: train_and_evaluate(p, a.model),
        argv,
        model_option,
    )


if __name__ == "__main__":
    main()
