"""Compiling and fitting a model from its config: optimiser and learning-rate schedule, class
weights or oversampled copies of smaller classes, early stopping, per-epoch MLflow metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.common import PipelineError, seed_everything
from pipeline.data.arrays import input_dir, load_arrays, sequence_inputs

log = logging.getLogger(__name__)


def build_model(name: str, cfg: dict, inputs, num_classes: int):
    from pipeline.models.builders import BUILDERS

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
            lr / 10 if warmup else lr,
            decay_steps=total,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    if warmup:
        raise ValueError("train.warmup_epochs needs train.lr_decay: cosine")
    if isinstance(decay, dict):
        return keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=int(decay["decay_steps"]), decay_rate=float(decay["decay_rate"])
        )
    if decay is not None:
        raise ValueError(f"train.lr_decay={decay!r}: null, cosine or {{decay_steps, decay_rate}}")
    return lr


def make_optimizer(train_cfg: dict, steps_per_epoch: int = 1):
    """Adam (the reference) or AdamW with `weight_decay`, at `learning_rate(...)`; with
    `ema_momentum`, it also keeps an exponential moving average of the weights (Polyak
    averaging), which `training_callbacks` validates and keeps."""
    import keras

    lr = learning_rate(train_cfg, steps_per_epoch)
    name = train_cfg["optimizer"]
    ema = train_cfg.get("ema_momentum")
    averaging = {"use_ema": True, "ema_momentum": float(ema)} if ema is not None else {}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr, **averaging)
    if name == "adamw":
        return keras.optimizers.AdamW(
            learning_rate=lr, weight_decay=float(train_cfg.get("weight_decay", 0.004)), **averaging
        )
    raise ValueError(f"train.optimizer={name!r} is not supported; one of {OPTIMIZERS}")


def training_callbacks(train_cfg: dict) -> list:
    """Early stopping on `early_stopping.monitor`, restoring the best epoch's weights, and the
    per-epoch MLflow logger. With weight averaging (`ema_momentum`) the averaged weights are
    the ones validated each epoch and kept (`SwapEMAWeights` first, so early stopping sees
    and restores them)."""
    import keras

    stop = train_cfg["early_stopping"]
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=stop["monitor"], patience=int(stop["patience"]), restore_best_weights=True
        ),
        epoch_logger(),
    ]
    if train_cfg.get("ema_momentum") is not None:
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    return callbacks


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights for the classes present in training; 1.0 for the rest."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def training_clips(
    inputs,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    class_weight: dict[int, float] | None = None,
    augment_cfg: dict | None = None,
    pad_value: int = 0,
    cache=None,
    num_frames: int | None = None,
):
    """A Keras PyDataset over the training clips, for what fixed arrays cannot give:

    - `augment_cfg` (`train.oversample`): augmented copies of the smaller classes' clips,
      new copies with new augmentations every epoch; the originals pass untouched;
    - `cache` (`train.temporal_jitter`): each clip's `num_frames` frames drawn afresh every
      epoch from all of its cached frames (one per segment), instead of the fixed ones.

    Batches are (x, y) or, with `class_weight`, (x, y, sample weights). Deterministic from
    `seed`; without a cache, the same batches as before temporal jitter existed.
    """
    import keras

    from pipeline.data.arrays import cached_frames, select_frames
    from pipeline.data.augment import augment_clip, oversample_indices
    from pipeline.data.temporal import jittered_indices
    from pipeline.models.distributed import take

    weights = (
        np.array([class_weight[c] for c in range(max(class_weight) + 1)], np.float32)
        if class_weight
        else None
    )

    class TrainingClips(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.plan()

        def plan(self):
            rng = np.random.default_rng([seed, self.epoch])
            extra = oversample_indices(labels, rng) if augment_cfg is not None else []
            order = np.concatenate([np.arange(len(labels)), extra]).astype(int)
            is_copy = np.arange(len(order)) >= len(labels)
            perm = rng.permutation(len(order))
            self.order, self.is_copy = order[perm], is_copy[perm]

        def __len__(self):
            return int(np.ceil(len(self.order) / batch_size))

        def __getitem__(self, batch):
            part = slice(batch * batch_size, (batch + 1) * batch_size)
            rows, copies = self.order[part], self.is_copy[part]
            rng = np.random.default_rng([seed, self.epoch, batch])
            if cache is None:
                x = take(inputs, rows)
            else:
                picks = jittered_indices(cached_frames(cache), num_frames, len(rows), rng)
                x = select_frames(take(cache, rows), picks)
            if copies.any():
                ones = np.ones(x.shape[1], dtype=bool)
                x = np.stack(
                    [
                        augment_clip(clip, ones, augment_cfg, rng, pad_value)[0] if copy else clip
                        for clip, copy in zip(x, copies)
                    ]
                )
            y = labels[rows]
            return (x, y) if weights is None else (x, y, weights[y])

        def on_epoch_end(self):
            self.epoch += 1
            self.plan()

    return TrainingClips()


def oversampled_features(
    inputs: dict, labels: np.ndarray, features_dir: Path, seed: int
) -> tuple[dict, np.ndarray]:
    """Training features plus copies of the smaller classes' clips, each copy taken from the
    cached features of an augmented version of the clip (`features.augmented_copies`)."""
    from pipeline.data.augment import oversample_indices

    directory = features_dir / "train"
    if not (directory / "aug_features.npy").is_file():
        raise PipelineError(
            "train.oversample needs augmented training features: set features.augmented_copies "
            ">= 1 and rerun the features stage (`dvc repro`)"
        )
    aug, aug_mask = load_arrays(directory, "aug_features", "aug_mask")
    rng = np.random.default_rng(seed)
    extra = oversample_indices(labels, rng)
    version = rng.integers(0, aug.shape[1], size=len(extra))
    copies = sequence_inputs(
        aug[extra, version], aug_mask[extra, version], inputs["features"].shape[1]
    )  # the model's num_frames
    return (
        {k: np.concatenate([inputs[k], copies[k]]) for k in ("features", "mask")},
        np.concatenate([labels, labels[extra]]),
    )


def training_data(params: dict, cfg: dict, x_train, y_train, num_classes: int, cache=None) -> dict:
    """The `model.fit` arguments for the training split: class weights by default, or
    (`train.oversample: true`) augmented copies of the smaller classes and no weights; with
    `train.temporal_jitter`, frames drawn afresh each epoch from `cache` (every cached frame
    of the training clips). Validation and test data never pass through here."""
    train_cfg = cfg["train"]
    batch_size = int(train_cfg["batch_size"])
    seed = int(params["seed"])
    oversample, jitter = train_cfg.get("oversample"), train_cfg.get("temporal_jitter")
    weights = (
        balanced_class_weights(y_train, num_classes)
        if train_cfg["class_weights"] and not oversample
        else None
    )
    if jitter and cache is None:
        raise ValueError(f"models.{cfg['name']}.train.temporal_jitter needs the cached frames")
    if oversample and train_cfg["class_weights"]:
        log.info("train.oversample is on: class weights are not used (classes are balanced)")
    if oversample and isinstance(x_train, dict):
        x, y = oversampled_features(x_train, y_train, input_dir(params, cfg), seed)
        log.info(
            "oversampling: %d training clips -> %d with augmented copies", len(y_train), len(y)
        )
        return {"x": x, "y": y, "batch_size": batch_size, "class_weight": None, "shuffle": True}
    if not (oversample or jitter):
        return {
            "x": x_train,
            "y": y_train,
            "batch_size": batch_size,
            "class_weight": weights,
            "shuffle": True,
        }
    data = training_clips(
        x_train,
        y_train,
        batch_size,
        seed,
        class_weight=weights,
        augment_cfg=params["augment"] if oversample else None,
        pad_value=int(params["frames"]["pad_value"]),
        cache=cache if jitter else None,
        num_frames=cfg.get("num_frames"),
    )
    log.info(
        "training clips: %d per epoch%s%s",
        len(data.order),
        f" ({len(y_train)} with augmented copies)" if oversample else "",
        ", frames drawn afresh each epoch (temporal jitter)" if jitter else "",
    )
    return {"x": data, "class_weight": None}


def epoch_logger():
    """A Keras callback logging every epoch's train/val loss and accuracy to the active run
    (none outside a run: fitting from a notebook or a test opens no stray MLflow run)."""
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if mlflow.active_run() is not None:
                mlflow.log_metrics(
                    {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"},
                    step=epoch,
                )

    return MlflowEpochLogger()


def fit_model(params: dict, name: str, data: dict, num_classes: int, seed: int):
    """Build, compile and fit one model from `seed`: (model, Keras history, seconds).

    `data` holds the train/val arrays. Everything random (init, shuffling, oversampling)
    follows `seed`; the data and the split do not change with it. Under a tf.distribute
    strategy (`distribute.strategy`) the model is trained under it and returned as a plain
    copy with the trained weights, for prediction and saving in this process alone.
    """

    from pipeline.models.backbones import weights_digest
    from pipeline.models.distributed import (
        fit_multi_worker,
        plain_copy,
        strategy_name,
        synchronize_batchnorm,
        take,
        training_strategy,
    )

    cfg = params["models"][name]
    train_cfg = cfg["train"]
    strategy = training_strategy(params)
    seed_everything(seed)
    x_train, y_train = data["train"]
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(name, cfg, x_train, num_classes)
        if strategy:
            synchronize_batchnorm(model)
        if any(layer.name == "feature_norm" for layer in model.layers):
            feats, mask = x_train["features"], x_train["mask"]
            model.get_layer("feature_norm").adapt(feats[mask][None])  # unrepeated frames, 1 x M x D
        fit_data = training_data(
            {**params, "seed": seed}, cfg, x_train, y_train, num_classes, data.get("train_cache")
        )
        steps = (
            len(fit_data["x"])
            if "y" not in fit_data
            else int(np.ceil(len(fit_data["y"]) / fit_data["batch_size"]))
        )
        optimizer = make_optimizer(train_cfg, steps)
        if strategy:
            optimizer.build(model.trainable_variables)  # its variables mirrored, made here
        model.compile(
            optimizer=optimizer,
            metrics=["accuracy"],
            loss="sparse_categorical_crossentropy",
            jit_compile=bool(train_cfg.get("jit_compile", False)),
        )
    callbacks = training_callbacks(train_cfg)
    start = time.perf_counter()
    if strategy_name(params) == "multi_worker":  # Keras' fit fails under it (see distributed.py)
        history = fit_multi_worker(
            strategy,
            model,
            optimizer,
            fit_data,
            data["val"],
            int(train_cfg["epochs"]),
            callbacks,
            seed,
        )
    else:
        history = model.fit(
            **fit_data,
            validation_data=data["val"],
            epochs=int(train_cfg["epochs"]),
            callbacks=callbacks,
            verbose=2,
        )
    seconds = time.perf_counter() - start
    if strategy:
        model = plain_copy(
            model, lambda: build_model(name, cfg, x_train, num_classes), take(x_train, slice(4))
        )
        log.info(
            "%s (seed %d): trained weights sha256 %s",
            name,
            seed,
            weights_digest(model.get_weights()),
        )
    return model, history, seconds
