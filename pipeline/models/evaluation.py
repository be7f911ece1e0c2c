"""What the train stage measures of a trained model: its probabilities per clip (with test-time
averaging over views in time and mirror images) and what it costs per clip at inference on
this machine."""

from __future__ import annotations

import functools
import time

import numpy as np

from pipeline.data.arrays import mirror_average, mirrored


def clip_probabilities(model, views: list, batch_size: int, hflip: bool = False) -> np.ndarray:
    """(clips x classes) probabilities, in the order of the clips: the average over `views`
    (the same clips' inputs, one per interleaved view of their frames; see
    `evaluation_views`); with `hflip` (a frame model's `tta_hflip`) each view's are averaged
    with those of its left-right mirror image."""
    probs = [
        mirror_average(model.predict(mirrored(x), batch_size=batch_size, verbose=0))
        if hflip
        else model.predict(x, batch_size=batch_size, verbose=0)
        for x in views
    ]
    return np.mean(probs, axis=0)


def model_ms_per_clip(model, views: list, batch_size: int, hflip: bool = False) -> float:
    """Time per test clip on this machine (the model is already warm; a forward pass per view,
    two with `hflip`: the clip's and its mirror image's), in ms."""
    inputs = views[0]
    n = len(inputs["features"]) if isinstance(inputs, dict) else len(inputs)
    start = time.perf_counter()
    clip_probabilities(model, views, batch_size, hflip)
    return (time.perf_counter() - start) / n * 1000


@functools.cache
def backbone_ms_per_clip(
    backbone_name: str, output_layer: str | None, size: int, num_frames: int
) -> float:
    """For models on cached features: the time the features backbone takes for one clip's
    frames (one batch of num_frames) up to its `output_layer`, which inference on a new clip
    has to pay too, in ms. Median of 3 after a warm-up; random weights (speed does not depend
    on them). Measured once per process and shape: the jobs of a sweep share it."""
    from pipeline.models.backbones import build_pooled_backbone, preprocess_for

    backbone = build_pooled_backbone(backbone_name, None, size, output_layer)
    batch = preprocess_for(backbone_name)(np.zeros((num_frames, size, size, 3), np.float32))
    backbone.predict_on_batch(batch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        backbone.predict_on_batch(batch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000
