"""The training loss and accuracy: crossentropy of each clip's label against the model's
probabilities, with the labels optionally smoothed (`train.label_smoothing`) and, with
`train.mixup`, training targets that are mixtures of two classes instead of class indices."""

from __future__ import annotations

import keras


def training_loss(label_smoothing: float, mixup: bool = False):
    """What `compile` takes: Keras' own sparse crossentropy without smoothing or mixup (as
    every model trained before the options), the loss below with either."""
    if not label_smoothing and not mixup:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(label_smoothing)


def training_accuracy(mixup: bool = False):
    """What `compile` takes as its metric: Keras' `accuracy` (which it resolves to the sparse
    kind for class indices) or, with mixup, `ClipAccuracy`, which reads both the mixed
    training targets (their larger class) and validation's class indices. Logged as
    `accuracy` and `val_accuracy` either way."""
    return ClipAccuracy() if mixup else "accuracy"


def per_clip_loss(label_smoothing: float):
    """The same loss, one value per clip (no reduction): for a custom training loop."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy
    return SmoothedSparseCrossentropy(label_smoothing).call


def target_distribution(y_true, classes):
    """Each clip's target over the `classes` classes: `y_true` as it is when it already is one
    (B, classes: mixup's mixed targets), the one-hot of its class indices otherwise (B or
    B, 1). Decided on the static shape, so each traced step takes one branch."""
    if len(y_true.shape) == 2 and y_true.shape[-1] == classes and classes > 1:
        return keras.ops.cast(y_true, "float32")
    return keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), classes)


@keras.saving.register_keras_serializable(package="handball")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Crossentropy against a label smoothed towards uniform: with smoothing s and K classes
    the true class weighs 1 - s + s/K and every other s/K (Szegedy et al., 2016), so the model
    is not pushed to certainty on a few hundred clips. Labels are class indices, as everywhere
    in the pipeline, or (mixup, training only) each clip's target distribution."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kw):
        super().__init__(name=name, **kw)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        targets = target_distribution(y_true, y_pred.shape[-1])
        return keras.losses.categorical_crossentropy(
            targets, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="handball")
class ClipAccuracy(keras.metrics.MeanMetricWrapper):
    """The share of clips whose most probable class is their target's largest class: a class
    index (validation) or the larger part of a mixed target (mixup's training batches)."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(clip_hits, name=name, dtype=dtype)

    def get_config(self) -> dict:
        return {"name": self.name, "dtype": self.dtype}


def clip_hits(y_true, y_pred):
    """1.0 per clip whose argmax matches its target's (`target_distribution`), else 0.0."""
    targets = target_distribution(y_true, y_pred.shape[-1])
    hits = keras.ops.equal(keras.ops.argmax(y_pred, axis=-1), keras.ops.argmax(targets, axis=-1))
    return keras.ops.cast(hits, "float32")
