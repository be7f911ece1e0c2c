"""The training loss: crossentropy of each clip's integer label against the model's
probabilities, with the labels optionally smoothed (`train.label_smoothing`)."""

from __future__ import annotations

import keras


def training_loss(label_smoothing: float):
    """What `compile` takes: Keras' own sparse crossentropy without smoothing (as every model
    trained before the option), the smoothed loss below with it."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(label_smoothing)


def per_clip_loss(label_smoothing: float):
    """The same loss, one value per clip (no reduction): for a custom training loop."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy
    return SmoothedSparseCrossentropy(label_smoothing).call


@keras.saving.register_keras_serializable(package="handball")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Crossentropy against a label smoothed towards uniform: with smoothing s and K classes
    the true class weighs 1 - s + s/K and every other s/K (Szegedy et al., 2016), so the model
    is not pushed to certainty on a few hundred clips. Labels are class indices, as everywhere
    in the pipeline."""

    def __init__(self, label_smoothing: float, name: str = "smoothed_sparse_crossentropy", **kw):
        super().__init__(name=name, **kw)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        labels = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), classes
        )
        return keras.losses.categorical_crossentropy(
            labels, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
