"""The learning rate over training: the configured schedule, evaluated once per step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    from pipeline.schema.model_sections import Training


def learning_rate(train: Training, steps_per_epoch: int):
    """The configured learning rate: constant, exponential decay (`lr_decay: {decay_steps,
    decay_rate}`, the reference) or `lr_decay: cosine` to 0 over `epochs`, after a linear
    warm-up of `warmup_epochs` (0: none) from a tenth of the rate (the schema allows warm-up
    with cosine decay only). A schedule comes wrapped in `OncePerStep`."""
    lr, decay = train.learning_rate, train.lr_decay
    warmup = int(train.warmup_epochs * steps_per_epoch)
    if decay == "cosine":
        total = max(1, train.epochs * steps_per_epoch - warmup)
        schedule = keras.optimizers.schedules.CosineDecay(
            lr / 10 if warmup else lr,
            decay_steps=total,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    elif decay is not None:
        schedule = keras.optimizers.schedules.ExponentialDecay(
            lr, decay_steps=decay.decay_steps, decay_rate=decay.decay_rate
        )
    else:
        return lr
    return OncePerStep(schedule)


@keras.saving.register_keras_serializable(package="handball")
class OncePerStep(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule`, computed once per traced training step instead of once per variable.

    Keras' AdamW asks for the learning rate again for each variable's weight decay, and each
    time a schedule adds its operations to the step's graph: for EfficientNetB0's 219 weights,
    ~440 copies of the schedule, which made frame_cnn's first step (tracing) 27 s longer on
    the sample (2-core Xeon, profiled). While a step is traced, the schedule's value for the
    step counter is made once and reused within that graph; eagerly (`run_eagerly`) it is
    computed on each call, as before. The same values.
    """

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule):
        self.schedule = schedule
        self._traced = None  # (step, graph, value) of the graph being traced

    def __call__(self, step):
        import tensorflow as tf

        if tf.executing_eagerly():
            self._traced = None
            return self.schedule(step)
        graph = tf.compat.v1.get_default_graph()
        if self._traced is None or self._traced[0] is not step or self._traced[1] is not graph:
            self._traced = (step, graph, self.schedule(step))
        return self._traced[2]

    def get_config(self) -> dict:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule)}

    @classmethod
    def from_config(cls, config: dict) -> OncePerStep:
        return cls(keras.saving.deserialize_keras_object(config["schedule"]))
