"""Stage `train@<model>`: train one model on the cached arrays, evaluate it on the test split.

    python -m pipeline.train --model cnn_gru

Writes `models/<model>/model.keras`, `metrics/<model>.json` (for `dvc metrics show`) and
`reports/<model>/` (confusion matrix PNG, classification report, per-class scores, test
predictions, learning curves), and logs one MLflow run with all of it plus the model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import (atomic_dir, load_arrays, resolve, seed_everything, stage_cli,
                             write_json_atomic)

log = logging.getLogger(__name__)


def frame_subset(total: int, n: int | None) -> np.ndarray:
    """Indices of `n` evenly spaced frames out of `total` cached ones (all when n is None)."""
    if n is None or int(n) == total:
        return np.arange(total)
    if not 1 <= int(n) <= total:
        raise ValueError(f"num_frames={n} but the cache holds {total} frames per clip "
                         f"(frames.num_frames); lower the model's num_frames or raise frames.num_frames")
    return np.linspace(0, total - 1, int(n)).round().astype(int)


def input_dir(params: dict, model_cfg: dict) -> Path:
    """The cache a model reads: `paths.frames` or `paths.features`."""
    kind = model_cfg["input"]
    if kind not in ("frames", "features"):
        raise ValueError(f"models.{model_cfg['name']}.input={kind!r}: one of frames, features")
    return resolve(params["paths"][kind])


def load_split(params: dict, model_cfg: dict, split: str):
    """(inputs, labels, clips) of one split, in the order the cache stores them."""
    kind = model_cfg["input"]
    directory = input_dir(params, model_cfg) / split
    if kind == "frames":
        frames, labels = load_arrays(directory, "frames", "labels")
        idx = frame_subset(frames.shape[1], model_cfg.get("num_frames"))
        inputs = frames[:, idx]
    else:
        feats, labels, mask = load_arrays(directory, "features", "labels", "mask")
        idx = frame_subset(feats.shape[1], model_cfg.get("num_frames"))
        inputs = {"features": feats[:, idx], "mask": mask[:, idx]}
    clips = pd.read_csv(directory / "clips.csv")
    if len(clips) != len(labels):
        raise ValueError(f"{directory}: {len(labels)} labels but {len(clips)} rows in clips.csv")
    return inputs, labels, clips


def build_model(name: str, cfg: dict, inputs, num_classes: int):
    from pipeline.models import BUILDERS

    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; one of {sorted(BUILDERS)}")
    if isinstance(inputs, dict):  # features: (clips, T, D)
        _, t, dim = inputs["features"].shape
        return BUILDERS[name](cfg, t, dim, num_classes)
    _, t, size = inputs.shape[:3]
    return BUILDERS[name](cfg, t, size, num_classes)


def make_optimizer(train_cfg: dict):
    import keras

    lr = float(train_cfg["learning_rate"])
    decay = train_cfg.get("lr_decay")
    if decay:
        lr = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=int(decay["decay_steps"]), decay_rate=float(decay["decay_rate"]))
    if train_cfg["optimizer"] != "adam":
        raise ValueError(f"optimizer {train_cfg['optimizer']!r} is not supported; use adam")
    return keras.optimizers.Adam(learning_rate=lr)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights for the classes present in training; 1.0 for the rest."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def epoch_logger():
    """A Keras callback logging every epoch's train/val loss and accuracy to the active run."""
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()
                                if k != "learning_rate"}, step=epoch)

    return MlflowEpochLogger()


def train_and_evaluate(params: dict, name: str) -> dict:
    import keras
    import mlflow

    from pipeline.evaluate import (classification_metrics, confusion_figure, report_text)
    from pipeline.tracking import flatten, run_tags, use_experiment

    if name not in params["models"]:
        raise ValueError(f"no config for model {name!r} under models: {sorted(params['models'])}")
    cfg = params["models"][name]
    train_cfg = cfg["train"]
    seed_everything(int(params["seed"]))
    classes = json.loads((input_dir(params, cfg) / "classes.json").read_text())
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    x_train, y_train, _ = load_split(params, cfg, "train")
    x_val, y_val, _ = load_split(params, cfg, "val")
    x_test, y_test, test_clips = load_split(params, cfg, "test")
    if len(y_val) == 0 or len(y_test) == 0:
        raise ValueError("the validation or test split is empty: the dataset needs more "
                         "recording groups per class (see the clean stage's warnings)")

    model = build_model(name, cfg, x_train, len(classes))
    if any(layer.name == "feature_norm" for layer in model.layers):
        feats, mask = x_train["features"], x_train["mask"]
        model.get_layer("feature_norm").adapt(feats[mask][None])  # unrepeated frames, as 1 x M x D
    model.compile(optimizer=make_optimizer(train_cfg), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=bool(train_cfg.get("jit_compile", False)))
    stop = train_cfg["early_stopping"]
    callbacks = [keras.callbacks.EarlyStopping(monitor=stop["monitor"], patience=int(stop["patience"]),
                                               restore_best_weights=True)]
    class_weight = balanced_class_weights(y_train, len(classes)) if train_cfg["class_weights"] else None

    use_experiment(params["mlflow"]["experiment"])
    reports = resolve(params["paths"]["reports"]) / name
    with mlflow.start_run(run_name=name, tags=run_tags(name, dataset["dataset_hash"])) as run:
        mlflow.log_params(flatten({"model": cfg, "frames": params["frames"],
                                   "features": params["features"], "seed": params["seed"],
                                   "dataset": {"name": dataset["name"]}}))
        start = time.perf_counter()
        history = model.fit(x_train, y_train, validation_data=(x_val, y_val),
                            epochs=int(train_cfg["epochs"]), batch_size=int(train_cfg["batch_size"]),
                            class_weight=class_weight, callbacks=callbacks + [epoch_logger()],
                            shuffle=True, verbose=2)
        train_time = time.perf_counter() - start

        # Predict in stored order; labels are read from the same arrays, so pairs stay aligned.
        probs = model.predict(x_test, batch_size=int(train_cfg["batch_size"]), verbose=0)
        y_pred = probs.argmax(axis=1)
        scores = classification_metrics(y_test, y_pred, classes)
        summary = {
            "accuracy": scores["accuracy"],
            "balanced_accuracy": scores["balanced_accuracy"],
            "macro_f1": scores["macro_f1"],
            "params": int(model.count_params()),
            "train_time_s": round(train_time, 2),
            "epochs": len(history.history["loss"]),
            "test_clips": int(len(y_test)),
        }
        mlflow.log_metrics({f"test_{k}": summary[k] for k in ("accuracy", "balanced_accuracy",
                                                               "macro_f1")})
        mlflow.log_metrics({"num_params": summary["params"], "epochs_trained": summary["epochs"],
                            "train_time_s": summary["train_time_s"]})
        mlflow.log_metrics({f"test_f1_{c}": s["f1"] for c, s in scores["per_class"].items()})

        fig = confusion_figure(y_test, y_pred, classes, f"{name}: test confusion matrix")
        report = report_text(y_test, y_pred, classes)
        per_class = pd.DataFrame(scores["per_class"]).T.rename_axis("class").reset_index()
        predictions = test_clips.assign(
            actual=[classes[i] for i in y_test], predicted=[classes[i] for i in y_pred],
            confidence=probs.max(axis=1).round(4))
        hist = pd.DataFrame(history.history).rename_axis("epoch").reset_index()
        with atomic_dir(reports) as tmp:
            fig.savefig(tmp / "confusion_matrix.png", dpi=100)
            (tmp / "classification_report.txt").write_text(report)
            per_class.to_csv(tmp / "per_class.csv", index=False)
            (tmp / "mlflow_run_id.txt").write_text(run.info.run_id + "\n")
            predictions.to_csv(tmp / "predictions.csv", index=False)
            hist.drop(columns=["learning_rate"], errors="ignore").to_csv(tmp / "history.csv",
                                                                         index=False)
        mlflow.log_figure(fig, "confusion_matrix.png")
        mlflow.log_text(report, "classification_report.txt")
        mlflow.log_dict(scores, "test_metrics.json")
        mlflow.log_artifact(str(reports / "predictions.csv"))

        with atomic_dir(resolve(params["paths"]["models"]) / name) as tmp:
            model.save(tmp / "model.keras")
        import tensorflow as tf

        first = ({k: v[:1] for k, v in x_test.items()} if isinstance(x_test, dict)
                 else x_test[:1])
        mlflow.keras.log_model(
            model, name="model", signature=mlflow.models.infer_signature(first, probs[:1]),
            pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"])
    write_json_atomic(resolve(params["paths"]["metrics"]) / f"{name}.json", summary)
    log.info("%s: test accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f after %d epochs "
             "(%.0f s, %d params)", name, summary["accuracy"], summary["balanced_accuracy"],
             summary["macro_f1"], summary["epochs"], train_time, summary["params"])
    return summary


def main(argv: list[str] | None = None) -> None:
    def model_option(parser):
        parser.add_argument("--model", required=True, help="frame_cnn | cnn3d | cnn_gru")

    stage_cli("train", __doc__.splitlines()[0], lambda p, a: train_and_evaluate(p, a.model),
              argv, model_option)


if __name__ == "__main__":
    main()
