"""Oversampling of the training split with augmented copies (never validation or test).

`oversample_indices` picks which training clips to copy so every class reaches the largest
class's count; `augment_clip` makes each copy differ from its original: a horizontal flip,
a small rotation, blur and noise (the same geometry for every frame of a clip, so motion is
preserved) and temporal jitter over the cached frames. All randomness comes from a
`numpy.random.Generator` the caller seeds, so a run is reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.data.flow import (
    FLOW_ZERO,
    RGB_CHANNELS,
    decode_speed,
    encode_speed,
    mirror_flow_channels,
)

if TYPE_CHECKING:
    from pipeline.schema.sections import Augment


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
    frames: np.ndarray,
    mask: np.ndarray,
    augment: Augment,
    rng: np.random.Generator,
    pad_value: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An augmented copy of one clip (N x H x W x 3 uint8, or x 5 with optical flow after the
    RGB channels) and its frame mask.

    `augment` (the config's section): `hflip` (probability), `rotation_deg` (max absolute angle), `blur` (probability
    of a 3x3 Gaussian blur), `noise_std` (Gaussian pixel noise), `temporal_jitter` (max frames
    a sampled position moves). The flow follows the geometry (a flip reverses its horizontal
    part, a rotation turns its vectors); blur and noise change only the RGB channels.
    """
    n, h, w = frames.shape[:3]
    idx = jitter_indices(n, augment.temporal_jitter, rng)
    rgb, flow = frames[idx, ..., :RGB_CHANNELS].copy(), frames[idx, ..., RGB_CHANNELS:].copy()
    new_mask = mask[idx].copy()
    new_mask[1:] &= idx[1:] != idx[:-1]  # a position repeated by the jitter is a repeat
    if rng.random() < augment.hflip:
        rgb, flow = rgb[:, :, ::-1], flow[:, :, ::-1].copy()
        if flow.size:
            mirror_flow_channels(flow, channel=0)
    angle = augment.rotation_deg
    if angle > 0:
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-angle, angle), 1.0)
        rgb = warp_frames(rgb, matrix, pad_value)
        if flow.size:
            flow = rotated_flow(warp_frames(flow, matrix, FLOW_ZERO), matrix[:, :2])
    if rng.random() < augment.blur:
        rgb = np.stack([cv2.GaussianBlur(f, (3, 3), 0) for f in rgb])
    std = augment.noise_std
    if std > 0:
        noisy = rgb.astype(np.float32) + rng.normal(0, std, rgb.shape).astype(np.float32)
        rgb = np.clip(noisy, 0, 255).astype(np.uint8)
    out = np.concatenate([rgb, flow], axis=-1) if flow.size else rgb
    return np.ascontiguousarray(out), new_mask


def warp_frames(frames: np.ndarray, matrix: np.ndarray, border: int) -> np.ndarray:
    """Every frame (N x H x W x C uint8) moved by the same 2 x 3 affine `matrix`."""
    h, w, channels = frames.shape[1:]
    warped = [
        cv2.warpAffine(
            f,
            matrix,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(border,) * channels,
        )
        for f in frames
    ]
    return np.stack(warped).reshape(frames.shape)  # warpAffine drops a 1-channel axis


def rotated_flow(flow: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """Flow vectors (uint8, ... x 2) turned by the linear part of the warp that moved them."""
    vectors = decode_speed(flow) @ linear.T.astype(np.float32)
    return encode_speed(vectors)


def mixed_batch(
    x,
    labels: np.ndarray,
    weights: np.ndarray | None,
    alpha: float,
    num_classes: int,
    rng: np.random.Generator,
):
    """mixup (Zhang et al., ICLR 2018) within one training batch: each clip blended with
    another clip of the batch, `lam * clip + (1 - lam) * partner` with `lam ~ Beta(alpha,
    alpha)` drawn per clip, and its target the same blend of the two one-hot labels (its
    sample weight, with class weights, the same blend of the two). `x` is an array
    (B, T, ...) or a dict of them, whose boolean arrays (masks) are joined, not blended.
    Returns (x, targets B x num_classes float32, weights or None)."""
    lam = rng.beta(alpha, alpha, size=len(labels)).astype(np.float32)
    partner = rng.permutation(len(labels))

    def blend(array: np.ndarray) -> np.ndarray:
        if array.dtype == bool:
            return array | array[partner]
        share = lam.reshape((-1,) + (1,) * (array.ndim - 1))
        return share * array.astype(np.float32) + (1 - share) * array[partner].astype(np.float32)

    mixed = {k: blend(v) for k, v in x.items()} if isinstance(x, dict) else blend(x)
    one_hot = np.eye(num_classes, dtype=np.float32)[labels]
    targets = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[partner]
    if weights is not None:
        weights = lam * weights + (1 - lam) * weights[partner]
    return mixed, targets, weights
