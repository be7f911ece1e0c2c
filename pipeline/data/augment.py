"""Oversampling of the training split with augmented copies (never validation or test).

`oversample_indices` picks which training clips to copy so every class reaches the largest
class's count; `augment_clip` makes each copy differ from its original: a horizontal flip,
a small rotation, blur and noise (the same geometry for every frame of a clip, so motion is
preserved) and temporal jitter over the cached frames. All randomness comes from a
`numpy.random.Generator` the caller seeds, so a run is reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np


def oversample_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of extra copies (drawn with replacement within each class) that bring every
    class present in `labels` up to the largest class count."""
    classes, counts = np.unique(labels, return_counts=True)
    target = counts.max() if len(counts) else 0
    extra = [
        rng.choice(np.flatnonzero(labels == c), size=target - n, replace=True)
        for c, n in zip(classes, counts)
        if n < target
    ]
    return np.concatenate(extra).astype(np.int64) if extra else np.zeros(0, dtype=np.int64)


def jitter_indices(n: int, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each of n frame positions moved by up to `max_shift` frames, kept inside and in order."""
    if max_shift <= 0:
        return np.arange(n)
    shifted = np.arange(n) + rng.integers(-max_shift, max_shift + 1, size=n)
    return np.sort(np.clip(shifted, 0, n - 1))


def augment_clip(
    frames: np.ndarray, mask: np.ndarray, cfg: dict, rng: np.random.Generator, pad_value: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An augmented copy of one clip (N x H x W x 3 uint8) and its frame mask.

    cfg keys: `hflip` (probability), `rotation_deg` (max absolute angle), `blur` (probability
    of a 3x3 Gaussian blur), `noise_std` (Gaussian pixel noise), `temporal_jitter` (max frames
    a sampled position moves).
    """
    n, h, w = frames.shape[:3]
    idx = jitter_indices(n, int(cfg.get("temporal_jitter", 0)), rng)
    out = frames[idx].copy()
    new_mask = mask[idx].copy()
    new_mask[1:] &= idx[1:] != idx[:-1]  # a position repeated by the jitter is a repeat
    if rng.random() < float(cfg.get("hflip", 0)):
        out = out[:, :, ::-1]
    angle = float(cfg.get("rotation_deg", 0))
    if angle > 0:
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-angle, angle), 1.0)
        out = np.stack(
            [
                cv2.warpAffine(
                    f,
                    matrix,
                    (w, h),
                    flags=cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=(pad_value,) * 3,
                )
                for f in out
            ]
        )
    if rng.random() < float(cfg.get("blur", 0)):
        out = np.stack([cv2.GaussianBlur(f, (3, 3), 0) for f in out])
    std = float(cfg.get("noise_std", 0))
    if std > 0:
        noisy = out.astype(np.float32) + rng.normal(0, std, out.shape).astype(np.float32)
        out = np.clip(noisy, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out), new_mask
