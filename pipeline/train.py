"""Stage `train@<model>`: train one model on the cached arrays, evaluate it on the test split.

    python -m pipeline.train --model cnn_gru                 # the DVC stage
    python -m pipeline.train -m model=cnn_gru model.dropout=0.1,0.3   # a sweep

Writes `models/<model>/model.keras`, `metrics/<model>.json` (for `dvc metrics show`) and
`reports/<model>/` (confusion matrix PNG, classification report, per-class scores, test
predictions, learning curves), and logs one MLflow run with all of it plus the model.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import (PipelineError, atomic_dir, load_arrays, resolve, seed_everything,
                             stage_cli, write_json_atomic)

log = logging.getLogger(__name__)


def frame_subset(total: int, n: int | None) -> np.ndarray:
    """Indices of `n` evenly spaced frames out of `total` cached ones (all when n is None)."""
    if n is None or int(n) == total:
        return np.arange(total)
    if not 1 <= int(n) <= total:
        raise ValueError(f"num_frames={n} but the cache holds {total} frames per clip "
                         f"(frames.num_frames); lower the model's num_frames or raise frames.num_frames")
    return np.linspace(0, total - 1, int(n)).round().astype(int)


def sequence_inputs(feats: np.ndarray, mask: np.ndarray, num_frames: int | None) -> dict:
    """A sequence model's inputs from cached per-frame features and their repeat mask:
    `num_frames` evenly spaced frames, valid frames first (a right-padded mask)."""
    from pipeline.frames import repeat_mask, right_align

    idx = frame_subset(feats.shape[1], num_frames)
    # a frame is valid in the subset when it is the first of its source frame there (the
    # cache's mask marks repeats of the previous position, which a subset may drop)
    source = np.cumsum(mask, axis=1)[:, idx]
    aligned, aligned_mask = right_align(feats[:, idx], repeat_mask(source))
    return {"features": aligned, "mask": aligned_mask}


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
        inputs = sequence_inputs(feats, mask, model_cfg.get("num_frames"))
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


OPTIMIZERS = ("adam", "adamw")


def learning_rate(train_cfg: dict, steps_per_epoch: int):
    """The configured learning rate: constant, exponential decay (`lr_decay: {decay_steps,
    decay_rate}`, the reference) or `lr_decay: cosine` to 0 over `epochs`, after a linear
    warm-up of `warmup_epochs` (0: none) from a tenth of the rate."""
    import keras

    lr = float(train_cfg["learning_rate"])
    decay = train_cfg.get("lr_decay")
    warmup = int(float(train_cfg.get("warmup_epochs") or 0) * steps_per_epoch)
    if decay == "cosine":
        total = max(1, int(train_cfg["epochs"]) * steps_per_epoch - warmup)
        return keras.optimizers.schedules.CosineDecay(
            lr / 10 if warmup else lr, decay_steps=total, warmup_target=lr if warmup else None,
            warmup_steps=warmup)
    if warmup:
        raise ValueError("train.warmup_epochs needs train.lr_decay: cosine")
    if isinstance(decay, dict):
        return keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=int(decay["decay_steps"]), decay_rate=float(decay["decay_rate"]))
    if decay is not None:
        raise ValueError(f"train.lr_decay={decay!r}: null, cosine or {{decay_steps, decay_rate}}")
    return lr


def make_optimizer(train_cfg: dict, steps_per_epoch: int = 1):
    """Adam (the reference) or AdamW with `weight_decay`, at `learning_rate(...)`."""
    import keras

    lr = learning_rate(train_cfg, steps_per_epoch)
    name = train_cfg["optimizer"]
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr,
                                      weight_decay=float(train_cfg.get("weight_decay", 0.004)))
    raise ValueError(f"train.optimizer={name!r} is not supported; one of {OPTIMIZERS}")


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights for the classes present in training; 1.0 for the rest."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def oversampled_clips(frames: np.ndarray, labels: np.ndarray, batch_size: int,
                      augment_cfg: dict, seed: int, pad_value: int = 0):
    """A Keras PyDataset over the training clips plus augmented copies of the smaller classes.

    Every epoch draws new copies (with new augmentations) so no two epochs see the same
    synthetic clips; originals are passed through untouched. Deterministic from `seed`.
    """
    import keras

    from pipeline.augment import augment_clip, oversample_indices

    ones = np.ones(frames.shape[1], dtype=bool)

    class OversampledClips(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.plan()

        def plan(self):
            rng = np.random.default_rng([seed, self.epoch])
            extra = oversample_indices(labels, rng)
            order = np.concatenate([np.arange(len(labels)), extra])
            is_copy = np.concatenate([np.zeros(len(labels), bool), np.ones(len(extra), bool)])
            perm = rng.permutation(len(order))
            self.order, self.is_copy = order[perm], is_copy[perm]

        def __len__(self):
            return int(np.ceil(len(self.order) / batch_size))

        def __getitem__(self, batch):
            part = slice(batch * batch_size, (batch + 1) * batch_size)
            rng = np.random.default_rng([seed, self.epoch, batch])
            x = np.stack([augment_clip(frames[i], ones, augment_cfg, rng, pad_value)[0] if copy
                          else frames[i] for i, copy in zip(self.order[part], self.is_copy[part])])
            return x, labels[self.order[part]]

        def on_epoch_end(self):
            self.epoch += 1
            self.plan()

    return OversampledClips()


def oversampled_features(inputs: dict, labels: np.ndarray, features_dir: Path, seed: int
                         ) -> tuple[dict, np.ndarray]:
    """Training features plus copies of the smaller classes' clips, each copy taken from the
    cached features of an augmented version of the clip (`features.augmented_copies`)."""
    from pipeline.augment import oversample_indices

    directory = features_dir / "train"
    if not (directory / "aug_features.npy").is_file():
        raise PipelineError(
            "train.oversample needs augmented training features: set features.augmented_copies "
            ">= 1 and rerun the features stage (`dvc repro`)")
    aug, aug_mask = load_arrays(directory, "aug_features", "aug_mask")
    rng = np.random.default_rng(seed)
    extra = oversample_indices(labels, rng)
    version = rng.integers(0, aug.shape[1], size=len(extra))
    copies = sequence_inputs(aug[extra, version], aug_mask[extra, version],
                             inputs["features"].shape[1])  # the model's num_frames
    return ({k: np.concatenate([inputs[k], copies[k]]) for k in ("features", "mask")},
            np.concatenate([labels, labels[extra]]))


def training_data(params: dict, cfg: dict, x_train, y_train, num_classes: int) -> dict:
    """The `model.fit` arguments for the training split: class weights by default, or
    (`train.oversample: true`) augmented copies of the smaller classes and no weights.
    Validation and test data never pass through here."""
    train_cfg = cfg["train"]
    batch_size = int(train_cfg["batch_size"])
    if not train_cfg.get("oversample"):
        weights = balanced_class_weights(y_train, num_classes) if train_cfg["class_weights"] else None
        return {"x": x_train, "y": y_train, "batch_size": batch_size, "class_weight": weights,
                "shuffle": True}
    seed = int(params["seed"])
    if train_cfg["class_weights"]:
        log.info("train.oversample is on: class weights are not used (classes are balanced)")
    if isinstance(x_train, dict):
        x, y = oversampled_features(x_train, y_train, input_dir(params, cfg), seed)
        log.info("oversampling: %d training clips -> %d with augmented copies", len(y_train),
                 len(y))
        return {"x": x, "y": y, "batch_size": batch_size, "class_weight": None, "shuffle": True}
    data = oversampled_clips(x_train, y_train, batch_size, params["augment"], seed,
                             int(params["frames"]["pad_value"]))
    log.info("oversampling: %d training clips -> %d per epoch with augmented copies",
             len(y_train), len(data.order))
    return {"x": data, "class_weight": None}


def epoch_logger():
    """A Keras callback logging every epoch's train/val loss and accuracy to the active run
    (none outside a run: fitting from a notebook or a test opens no stray MLflow run)."""
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if mlflow.active_run() is not None:
                mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()
                                    if k != "learning_rate"}, step=epoch)

    return MlflowEpochLogger()


def log_dataset_counts(dataset: dict, train_clips: int, clean_dir: Path) -> None:
    """What the model was trained on, in the active MLflow run: clip counts, what the clean
    stage quarantined and why (metrics `data_*`), and the quarantine report itself."""
    import mlflow

    metrics = {"data_clips": dataset["clips"], "data_usable": dataset["usable"],
               "data_quarantined": dataset.get("quarantined", 0), "data_train_clips": train_clips}
    metrics.update({f"data_quarantined_{k}": v
                    for k, v in dataset.get("quarantined_by_reason", {}).items()})
    mlflow.log_metrics(metrics)
    if (clean_dir / "quarantine.csv").is_file():
        mlflow.log_artifact(str(clean_dir / "quarantine.csv"), artifact_path="data")


def model_ms_per_clip(model, inputs, batch_size: int) -> float:
    """Forward time per test clip on this machine (the model is already warm), in ms."""
    n = len(inputs["features"]) if isinstance(inputs, dict) else len(inputs)
    start = time.perf_counter()
    model.predict(inputs, batch_size=batch_size, verbose=0)
    return (time.perf_counter() - start) / n * 1000


@functools.lru_cache(maxsize=None)
def backbone_ms_per_clip(backbone_name: str, size: int, num_frames: int) -> float:
    """For models on cached features: the time the features backbone takes for one clip's
    frames (one batch of num_frames), which inference on a new clip has to pay too, in ms.
    Median of 3 after a warm-up; random weights (speed does not depend on them). Measured
    once per process and shape: the jobs of a sweep share it."""
    from pipeline.backbones import build_backbone, preprocess_for

    backbone = build_backbone(backbone_name, None, (size, size, 3),
                              config_key="features.weights", pooling="avg")
    batch = preprocess_for(backbone_name)(np.zeros((num_frames, size, size, 3), np.float32))
    backbone.predict_on_batch(batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        backbone.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def fit_model(params: dict, name: str, data: dict, num_classes: int, seed: int):
    """Build, compile and fit one model from `seed`: (model, Keras history, seconds).

    `data` holds the train/val arrays. Everything random (init, shuffling, oversampling)
    follows `seed`; the data and the split do not change with it.
    """
    import keras

    cfg = params["models"][name]
    train_cfg = cfg["train"]
    seed_everything(seed)
    x_train, y_train = data["train"]
    model = build_model(name, cfg, x_train, num_classes)
    if any(layer.name == "feature_norm" for layer in model.layers):
        feats, mask = x_train["features"], x_train["mask"]
        model.get_layer("feature_norm").adapt(feats[mask][None])  # unrepeated frames, as 1 x M x D
    fit_data = training_data({**params, "seed": seed}, cfg, x_train, y_train, num_classes)
    steps = (len(fit_data["x"]) if "y" not in fit_data
             else int(np.ceil(len(fit_data["y"]) / fit_data["batch_size"])))
    model.compile(optimizer=make_optimizer(train_cfg, steps), metrics=["accuracy"],
                  loss="sparse_categorical_crossentropy",
                  jit_compile=bool(train_cfg.get("jit_compile", False)))
    stop = train_cfg["early_stopping"]
    callbacks = [keras.callbacks.EarlyStopping(monitor=stop["monitor"], patience=int(stop["patience"]),
                                               restore_best_weights=True), epoch_logger()]
    start = time.perf_counter()
    history = model.fit(**fit_data, validation_data=data["val"], epochs=int(train_cfg["epochs"]),
                        callbacks=callbacks, verbose=2)
    return model, history, time.perf_counter() - start


def repeat_over_seeds(params: dict, name: str, data: dict, classes: list[str], first: dict,
                      tags: dict) -> dict:
    """Train again with every seed of `train_seeds` other than `seed`, each as a nested MLflow
    run, and return mean and standard deviation of the test scores over all seeds."""
    import keras
    import mlflow

    from pipeline.evaluate import classification_metrics

    seeds = [int(s) for s in params.get("train_seeds") or [] if int(s) != int(params["seed"])]
    if not seeds:
        return {}
    x_test, y_test = data["test"]
    batch_size = int(params["models"][name]["train"]["batch_size"])
    rows = [{k: first[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}]
    for seed in seeds:
        keras.backend.clear_session()
        with mlflow.start_run(run_name=f"{name} seed {seed}", nested=True,
                              tags={**tags, "seed": str(seed)}):
            mlflow.log_param("seed", seed)
            model, _, _ = fit_model(params, name, data, len(classes), seed)
            y_pred = model.predict(x_test, batch_size=batch_size, verbose=0).argmax(axis=1)
            scores = classification_metrics(y_test, y_pred, classes)
            rows.append({k: scores[k] for k in rows[0]})
            mlflow.log_metrics({f"test_{k}": v for k, v in rows[-1].items()})
        log.info("%s seed %d: test macro-F1 %.3f", name, seed, rows[-1]["macro_f1"])
    table = pd.DataFrame(rows)
    out = {"seeds": len(rows)}
    for key in table:
        out[f"{key}_mean"] = float(table[key].mean())
        out[f"{key}_std"] = float(table[key].std(ddof=1))
    return out


def train_and_evaluate(params: dict, name: str, parent_run_id: str | None = None,
                       extra_tags: dict | None = None) -> dict:
    """Train model `name`, evaluate it on validation and test, write its outputs under
    `paths.*`, log one MLflow run (a child of `parent_run_id` in a sweep) and return the
    summary that goes to `metrics/<name>.json`."""
    import mlflow

    from pipeline.evaluate import (classification_metrics, confusion_figure, report_text)
    from pipeline.inference import log_video_classifier, preprocessing_config
    from pipeline.tracking import flatten, run_tags, use_experiment

    if name not in params["models"]:
        raise ValueError(f"no config for model {name!r} under models: {sorted(params['models'])}")
    cfg = params["models"][name]
    train_cfg = cfg["train"]
    classes = json.loads((input_dir(params, cfg) / "classes.json").read_text())
    dataset = json.loads((resolve(params["paths"]["clean"]) / "dataset.json").read_text())
    x_train, y_train, _ = load_split(params, cfg, "train")
    x_val, y_val, _ = load_split(params, cfg, "val")
    x_test, y_test, test_clips = load_split(params, cfg, "test")
    if len(y_val) == 0 or len(y_test) == 0:
        raise ValueError("the validation or test split is empty: the dataset needs more "
                         "recording groups per class (see the clean stage's warnings)")
    data = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}

    use_experiment(params["mlflow"]["experiment"])
    reports = resolve(params["paths"]["reports"]) / name
    tags = {**run_tags(name, dataset), **(extra_tags or {})}
    with mlflow.start_run(run_name=name, tags=tags, parent_run_id=parent_run_id,
                          nested=parent_run_id is not None) as run:
        mlflow.log_params(flatten({"model": cfg, "frames": params["frames"],
                                   "features": params["features"], "seed": params["seed"],
                                   "train_seeds": params.get("train_seeds"),
                                   "dataset": {"name": dataset["name"],
                                               "split_source": dataset.get("split_source")}}))
        if train_cfg.get("oversample"):
            mlflow.log_params(flatten({"augment": params["augment"]}))
        log_dataset_counts(dataset, len(y_train), resolve(params["paths"]["clean"]))
        model, history, train_time = fit_model(params, name, data, len(classes),
                                               int(params["seed"]))

        # Predict in stored order; labels are read from the same arrays, so pairs stay aligned.
        probs = model.predict(x_test, batch_size=int(train_cfg["batch_size"]), verbose=0)
        y_pred = probs.argmax(axis=1)
        scores = classification_metrics(y_test, y_pred, classes)
        # validation scores of the final (restored best) weights: what sweeps select on
        val_pred = model.predict(x_val, batch_size=int(train_cfg["batch_size"]),
                                 verbose=0).argmax(axis=1)
        val_scores = classification_metrics(y_val, val_pred, classes)
        model_ms = model_ms_per_clip(model, x_test, int(train_cfg["batch_size"]))
        streams = 2 if params["features"].get("motion") else 1  # appearance (+ motion)
        backbone_ms = (backbone_ms_per_clip(params["features"]["backbone"],
                                            int(params["frames"]["size"]),
                                            x_test["features"].shape[1] * streams)
                       if isinstance(x_test, dict) else 0.0)
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
        mlflow.log_metrics({f"test_{k}": summary[k] for k in ("accuracy", "balanced_accuracy",
                                                               "macro_f1")})
        mlflow.log_metrics({"num_params": summary["params"], "epochs_trained": summary["epochs"],
                            "train_time_s": summary["train_time_s"],
                            **{k: summary[k] for k in ("inference_ms_per_clip",
                                                       "model_ms_per_clip",
                                                       "backbone_ms_per_clip")}})
        mlflow.log_metrics({f"test_f1_{c}": s["f1"] for c, s in scores["per_class"].items()})
        # `eval_val_*`: Keras already logs a per-epoch `val_accuracy` history
        mlflow.log_metrics({f"eval_val_{k}": val_scores[k]
                            for k in ("accuracy", "balanced_accuracy", "macro_f1")})

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
            predictions.to_csv(tmp / "predictions.csv", index=False)
            hist.drop(columns=["learning_rate"], errors="ignore").to_csv(tmp / "history.csv",
                                                                         index=False)
        mlflow.log_figure(fig, "confusion_matrix.png")
        mlflow.log_text(report, "classification_report.txt")
        mlflow.log_dict(scores, "test_metrics.json")
        mlflow.log_artifact(str(reports / "predictions.csv"))

        model_dir = resolve(params["paths"]["models"]) / name
        with atomic_dir(model_dir) as tmp:
            model.save(tmp / "model.keras")
        # the MLflow model classifies video files: it carries this run's preprocessing
        info = log_video_classifier(model_dir / "model.keras",
                                    preprocessing_config(params, name, classes))
        # where this model lives in the local MLflow store (compare registers the champion)
        write_json_atomic(reports / "mlflow.json", {"run_id": run.info.run_id,
                                                    "model_uri": info.model_uri})
        spread = repeat_over_seeds(params, name, data, classes, summary, tags)
        if spread:
            summary.update({k: round(v, 4) for k, v in spread.items()})
            mlflow.log_metrics({f"test_{k}": v for k, v in spread.items() if k != "seeds"})
            mlflow.log_metric("seeds", spread["seeds"])
    write_json_atomic(resolve(params["paths"]["metrics"]) / f"{name}.json", summary)
    log.info("%s: test accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f after %d epochs "
             "(%.0f s, %d params)%s", name, summary["accuracy"], summary["balanced_accuracy"],
             summary["macro_f1"], summary["epochs"], train_time, summary["params"],
             f"; over {spread['seeds']} seeds macro-F1 {spread['macro_f1_mean']:.3f} ± "
             f"{spread['macro_f1_std']:.3f}" if spread else "")
    return summary


def is_hydra_command(argv: list[str]) -> bool:
    """`-m`/`--multirun` or bare `key=value` overrides: a Hydra sweep, not the DVC stage."""
    return any(a in ("-m", "--multirun") or ("=" in a and not a.startswith("-")) for a in argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if is_hydra_command(argv):
        from pipeline.sweep import hydra_main

        sys.argv = [sys.argv[0], *argv]
        hydra_main()
        return

    def model_option(parser):
        parser.add_argument("--model", required=True, help="frame_cnn | cnn3d | cnn_gru")

    stage_cli("train", __doc__.splitlines()[0], lambda p, a: train_and_evaluate(p, a.model),
              argv, model_option)


if __name__ == "__main__":
    main()
