"""Seeding every source of randomness a training run has."""

from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and (if loaded) Keras/TensorFlow for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Same seed, same data -> same model: without this, multi-threaded CPU kernels reorder
    # float sums and two runs of one config end with different test scores.
    tf.config.experimental.enable_op_determinism()
