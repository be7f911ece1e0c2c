"""Which of a clip's cached frames a model reads, when the cache holds more than the model's
`num_frames`: the interleaved views that test-time averaging over time classifies one by one
(`tta_views`), and a fresh pick per training epoch (`train.temporal_jitter`, the segment
sampling of temporal segment networks: the clip cut into `num_frames` equal segments, one
frame taken at random from each).
"""

from __future__ import annotations

import numpy as np


def view_count(total: int, num_frames: int | None) -> int:
    """How many interleaved subsets of `num_frames` frames `total` cached frames give (1: the
    cache holds no more than the model reads, so there is nothing to vary)."""
    return 1 if num_frames is None else max(1, total // int(num_frames))


def view_indices(total: int, num_frames: int | None) -> np.ndarray:
    """(views x num_frames) cached-frame indices: the clip cut into `num_frames` equal
    segments, view v taking the frame (v + 1/2) / views of the way through each segment.
    16 cached frames, 8 read: [0, 2, ..., 14] and [1, 3, ..., 15]."""
    views = view_count(total, num_frames)
    n = total if num_frames is None else int(num_frames)
    if not 1 <= n <= total:
        raise ValueError(
            f"num_frames={n} but the cache holds {total} frames per clip "
            f"(frames.num_frames); lower the model's num_frames or raise frames.num_frames"
        )
    position = np.arange(n)[None, :] + (np.arange(views)[:, None] + 0.5) / views
    return np.floor(position * total / n).astype(int)


def jittered_indices(
    total: int, num_frames: int | None, clips: int, rng: np.random.Generator
) -> np.ndarray:
    """(clips x num_frames) cached-frame indices, each segment's frame drawn at random from
    those the views take there (every view's frame equally likely, independently per clip
    and segment)."""
    table = view_indices(total, num_frames)
    pick = rng.integers(0, len(table), size=(clips, table.shape[1]))
    return table[pick, np.arange(table.shape[1])]
