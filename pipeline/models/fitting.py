"""Compiling and fitting a model from its config: optimiser and learning-rate schedule, the
training data (`training_data`), early stopping, per-epoch MLflow metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from pipeline.models.schedules import learning_rate
from pipeline.models.seeding import seed_everything
from pipeline.models.training_data import training_data

if TYPE_CHECKING:
    from pipeline.models.fit_job import FitJob
    from pipeline.schema import ModelSection
    from pipeline.schema.model_sections import Training

log = logging.getLogger(__name__)


def build_model(cfg: ModelSection, inputs, num_classes: int):
    """The model `cfg` describes, for inputs shaped like `inputs` (frames B,T,S,S,I or
    {"features": B,T,D, "mask": B,T})."""
    from pipeline.models.builders import BUILDERS

    if isinstance(inputs, dict):  # features: (clips, T, D)
        _, t, dim = inputs["features"].shape
        return BUILDERS[cfg.name](cfg, t, dim, num_classes)
    _, t, size = inputs.shape[:3]
    return BUILDERS[cfg.name](cfg, t, size, num_classes)


def make_optimizer(train: Training, steps_per_epoch: int = 1):
    """Adam (the reference) or AdamW with `weight_decay`, at `learning_rate(...)`; with
    `ema_momentum`, it also keeps an exponential moving average of the weights (Polyak
    averaging), which `training_callbacks` validates and keeps."""
    import keras

    lr = learning_rate(train, steps_per_epoch)
    ema = train.ema_momentum
    averaging = {"use_ema": True, "ema_momentum": ema} if ema is not None else {}
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(
            learning_rate=lr, weight_decay=train.weight_decay, **averaging
        )
    return keras.optimizers.Adam(learning_rate=lr, **averaging)


def create_training_variables(model, x_sample, y_sample) -> None:
    """Make the variables a training step needs (the optimiser's moments and averages, the
    metrics' state) now, eagerly, from one clip. Left to Keras, they are made while the first
    step is traced, slowly (frame_cnn's 657 took 19 s), and a step that makes variables is
    traced twice: together 22 s of frame_cnn's first epoch on the sample. Changes no weight."""
    model.optimizer.build(model.trainable_variables)
    y_pred = model(x_sample, training=False)
    model.compute_metrics(x_sample, y_sample, y_pred, sample_weight=None)


def training_callbacks(train: Training, metric_prefix: str = "") -> list:
    """Early stopping on `early_stopping.monitor`, restoring the best epoch's weights, and the
    per-epoch MLflow logger (metrics named `<metric_prefix><name>`). With weight averaging
    (`ema_momentum`) the averaged weights are the ones validated each epoch and kept
    (`SwapEMAWeights` first, so early stopping sees and restores them)."""
    import keras

    stop = train.early_stopping
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=stop.monitor, patience=stop.patience, restore_best_weights=True
        ),
        epoch_logger(metric_prefix),
    ]
    if train.ema_momentum is not None:
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    return callbacks


def epoch_logger(prefix: str = ""):
    """A Keras callback logging every epoch's train/val loss and accuracy to the active run as
    `<prefix><name>` (none outside a run: fitting from a notebook or a test opens no stray
    MLflow run)."""
    import keras
    import mlflow

    class MlflowEpochLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if mlflow.active_run() is not None:
                mlflow.log_metrics(
                    {
                        f"{prefix}{k}": float(v)
                        for k, v in (logs or {}).items()
                        if k != "learning_rate"
                    },
                    step=epoch,
                )

    return MlflowEpochLogger()


def fit_model(job: FitJob, data: dict, num_classes: int, seed: int):
    """Build, compile and fit one model from `seed`: (model, Keras history, seconds). With
    `train.networks` > 1, that many networks are fitted, each from its own seed
    (`member_seeds`), and returned as one model averaging their probabilities, with their
    histories merged (`pipeline.models.members`) and their seconds summed."""
    import keras

    from pipeline.models.members import (
        averaged_model,
        member_seeds,
        merged_history,
        metric_prefix,
    )

    seeds = member_seeds(seed, job.model.train.networks)
    if len(seeds) == 1:
        return fit_member(job, data, num_classes, seed)
    fitted = []
    for k, member_seed in enumerate(seeds, start=1):
        log.info("%s: network %d of %d, seed %d", job.model.name, k, len(seeds), member_seed)
        fitted.append(fit_member(job, data, num_classes, member_seed, metric_prefix(k)))
    models, histories, seconds = zip(*fitted)
    history = keras.callbacks.History()
    history.history = merged_history([h.history for h in histories])
    return averaged_model(list(models), job.model.name), history, sum(seconds)


def fit_member(job: FitJob, data: dict, num_classes: int, seed: int, metric_prefix: str = ""):
    """Build, compile and fit one network from `seed`: (model, Keras history, seconds), its
    per-epoch MLflow metrics named `<metric_prefix><name>`.

    `data` holds the train/val arrays. Everything random (init, shuffling, oversampling)
    follows `seed`; the data and the split do not change with it. Under a tf.distribute
    strategy (`distribute.strategy`) the model is trained under it and returned as a plain
    copy with the trained weights, for prediction and saving in this process alone.
    """

    from pipeline.models.backbones import weights_digest
    from pipeline.models.distributed import (
        fit_multi_worker,
        plain_copy,
        synchronize_batchnorm,
        take,
        training_strategy,
    )
    from pipeline.models.losses import per_clip_loss, training_accuracy, training_loss

    cfg, train = job.model, job.model.train
    strategy = training_strategy(job.strategy)
    if train.jit_compile:
        log.warning(
            "models.%s.train.jit_compile: XLA compiles the training step, with TensorFlow's op "
            "determinism off (Keras refuses XLA under it): two runs of this config can differ",
            cfg.name,
        )
    seed_everything(seed, deterministic_ops=not train.jit_compile)
    x_train, y_train = data["train"]
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(cfg, x_train, num_classes)
        if strategy:
            synchronize_batchnorm(model)
        if any(layer.name == "feature_norm" for layer in model.layers):
            feats, mask = x_train["features"], x_train["mask"]
            model.get_layer("feature_norm").adapt(feats[mask][None])  # unrepeated frames, 1 x M x D
        fit_data = training_data(job, seed, x_train, y_train, num_classes, data.get("train_cache"))
        steps = fit_data.get("steps_per_epoch") or int(
            np.ceil(len(fit_data["y"]) / fit_data["batch_size"])
        )
        optimizer = make_optimizer(train, steps)
        if strategy:
            optimizer.build(model.trainable_variables)  # its variables mirrored, made here
        model.compile(
            optimizer=optimizer,
            metrics=[training_accuracy(bool(train.mixup))],
            loss=training_loss(train.label_smoothing, bool(train.mixup)),
            jit_compile=train.jit_compile,
            run_eagerly=train.run_eagerly,
        )
        if not strategy:  # under a strategy Keras makes them before tracing
            create_training_variables(model, take(x_train, slice(1)), y_train[:1])
    callbacks = training_callbacks(train, metric_prefix)
    start = time.perf_counter()
    if job.strategy == "multi_worker":  # Keras' fit fails under it (see distributed.py)
        history = fit_multi_worker(
            strategy,
            model,
            optimizer,
            fit_data,
            data["val"],
            train.epochs,
            callbacks,
            seed,
            per_clip_loss(train.label_smoothing),
        )
    else:
        history = model.fit(
            **fit_data,
            validation_data=data["val"],
            epochs=train.epochs,
            callbacks=callbacks,
            verbose=2,
        )
    seconds = time.perf_counter() - start
    if strategy:
        model = plain_copy(
            model, lambda: build_model(cfg, x_train, num_classes), take(x_train, slice(4))
        )
        log.info(
            "%s (seed %d): trained weights sha256 %s",
            cfg.name,
            seed,
            weights_digest(model.get_weights()),
        )
    return model, history, seconds
