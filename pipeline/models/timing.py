"""What a trained model costs per clip at inference on this machine (train's metrics)."""

from __future__ import annotations

import functools
import time

import numpy as np


def model_ms_per_clip(model, inputs, batch_size: int) -> float:
    """Forward time per test clip on this machine (the model is already warm), in ms."""
    n = len(inputs["features"]) if isinstance(inputs, dict) else len(inputs)
    start = time.perf_counter()
    model.predict(inputs, batch_size=batch_size, verbose=0)
    return (time.perf_counter() - start) / n * 1000


@functools.cache
def backbone_ms_per_clip(backbone_name: str, size: int, num_frames: int) -> float:
    """For models on cached features: the time the features backbone takes for one clip's
    frames (one batch of num_frames), which inference on a new clip has to pay too, in ms.
    Median of 3 after a warm-up; random weights (speed does not depend on them). Measured
    once per process and shape: the jobs of a sweep share it."""
    from pipeline.models.backbones import build_backbone, preprocess_for

    backbone = build_backbone(
        backbone_name, None, (size, size, 3), config_key="features.weights", pooling="avg"
    )
    batch = preprocess_for(backbone_name)(np.zeros((num_frames, size, size, 3), np.float32))
    backbone.predict_on_batch(batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        backbone.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000
