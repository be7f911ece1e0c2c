"""Seeding every source of randomness a training run has."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int, deterministic_ops: bool = True) -> None:
    """Seed Python, NumPy and Keras/TensorFlow for reproducible runs.

    `deterministic_ops=False` turns TensorFlow's op determinism off (it is process-wide): Keras
    refuses XLA (`jit_compile`) under it and trains without, with only a warning.
    """
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Same seed, same data -> same model: without this, multi-threaded CPU kernels reorder
    # float sums and two runs of one config end with different test scores.
    if deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework.config import disable_op_determinism

        disable_op_determinism()
