"""Cached arrays: writing them row by row, loading them, and the inputs each model reads
(frame subsets, right-padded masks for sequence models).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.config import resolve
from pipeline.data.flow import (
    FLOW_CHANNELS,
    RGB_CHANNELS,
    mirror_flow_channels,
    pooled_flow,
    with_flow,
)
from pipeline.data.temporal import view_indices
from pipeline.data.video import repeat_mask

if TYPE_CHECKING:
    from pipeline.schema import ModelSection
    from pipeline.schema.sections import Paths


def save_arrays(directory: Path, **arrays: np.ndarray) -> None:
    """Save each array as `<name>.npy` (no pickles) in an existing directory."""
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", np.asarray(array), allow_pickle=False)


class NpyRowWriter:
    """Write a `.npy` array row by row (rows in order), holding one row in memory at a time.

    Unlike a memory map, written pages do not stay in the process's resident memory. Closing
    before every row was written raises, so a short array is never left looking complete.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype) -> None:
        self.path, self.shape, self.dtype = (
            Path(path),
            tuple(int(d) for d in shape),
            np.dtype(dtype),
        )
        self.rows = 0
        self.fh = open(self.path, "wb")  # noqa: SIM115 (a writer object: close() ends it)
        np.lib.format.write_array_header_2_0(
            self.fh,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": self.shape,
            },
        )

    def write(self, row: np.ndarray) -> None:
        row = np.ascontiguousarray(row, dtype=self.dtype)
        if row.shape != self.shape[1:]:
            raise ValueError(f"{self.path}: row of shape {row.shape}, expected {self.shape[1:]}")
        self.fh.write(row.tobytes())
        self.rows += 1

    def close(self) -> None:
        self.fh.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} rows written of {self.shape[0]}")


def load_arrays(directory: Path, *names: str, mmap_mode: str | None = None) -> list[np.ndarray]:
    """Load `<name>.npy` arrays (never pickles); `mmap_mode="r"` maps them instead of reading."""
    missing = [n for n in names if not (directory / f"{n}.npy").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} lacks {', '.join(m + '.npy' for m in missing)}: run `dvc repro` first"
        )
    return [np.load(directory / f"{n}.npy", allow_pickle=False, mmap_mode=mmap_mode) for n in names]


def right_align(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame values (B x T x ...) with each row's valid frames moved to the front, in
    order, and its masked-out frames (repeats) after them: a right-padded mask, the only
    layout cuDNN's recurrent layers accept. Padding positions repeat the last valid frame."""
    values, mask = np.asarray(values), np.asarray(mask, dtype=bool)
    if values.shape[:2] != mask.shape:
        raise ValueError(f"values {values.shape} and mask {mask.shape} do not match")
    counts = mask.sum(axis=1)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} clip(s) have no valid frame in the mask")
    t = mask.shape[1]
    # the k-th valid frame of each row at position k; after the last, the last valid frame
    order = np.argsort(~mask, axis=1, kind="stable")
    pos = np.minimum(np.arange(t)[None, :], counts[:, None] - 1)
    src = np.take_along_axis(order, pos, axis=1)
    aligned = np.take_along_axis(values, src.reshape(src.shape + (1,) * (values.ndim - 2)), axis=1)
    return aligned, np.arange(t)[None, :] < counts[:, None]


def frame_subset(total: int, n: int | None) -> np.ndarray:
    """Indices of `n` evenly spaced frames out of `total` cached ones (all when n is None)."""
    if n is None or int(n) == total:
        return np.arange(total)
    if not 1 <= int(n) <= total:
        raise ValueError(
            f"num_frames={n} but the cache holds {total} frames per clip "
            f"(frames.num_frames); lower the model's num_frames or raise frames.num_frames"
        )
    return np.linspace(0, total - 1, int(n)).round().astype(int)


def sequence_inputs(feats: np.ndarray, mask: np.ndarray, num_frames: int | None) -> dict:
    """A sequence model's inputs from cached per-frame features and their repeat mask:
    `num_frames` evenly spaced frames, valid frames first (a right-padded mask)."""
    return take_sequence(feats, mask, frame_subset(feats.shape[1], num_frames))


def take_sequence(feats: np.ndarray, mask: np.ndarray, idx: np.ndarray) -> dict:
    """A sequence model's inputs from frames `idx` of cached per-frame features (the same
    frames of every clip, or one row of indices per clip), valid frames first."""
    rows = np.arange(len(feats))[:, None]
    idx = np.broadcast_to(idx, (len(feats), np.shape(idx)[-1]))
    # a frame is valid in the subset when it is the first of its source frame there (the
    # cache's mask marks repeats of the previous position, which a subset may drop)
    source = np.cumsum(mask, axis=1)[rows, idx]
    aligned, aligned_mask = right_align(feats[rows, idx], repeat_mask(source))
    return {"features": aligned, "mask": aligned_mask}


def cached_frames(cache) -> int:
    """How many frames per clip a split's cache (see `load_cache`) holds."""
    return (cache["features"] if isinstance(cache, dict) else cache).shape[1]


def select_frames(cache, idx: np.ndarray):
    """A model's inputs from frames `idx` of a split's cache (the same frames of every clip,
    or one row of indices per clip)."""
    if isinstance(cache, dict):
        return take_sequence(cache["features"], cache["mask"], idx)
    idx = np.asarray(idx)
    return cache[:, idx] if idx.ndim == 1 else cache[np.arange(len(cache))[:, None], idx]


def fixed_inputs(cache, num_frames: int | None):
    """A model's `num_frames` evenly spaced frames (all when None) of every clip of a split's
    cache."""
    return select_frames(cache, frame_subset(cached_frames(cache), num_frames))


def evaluation_views(cache, num_frames: int | None, views: bool) -> list:
    """The inputs a model is evaluated on: with `views` (the model's `tta_views`), one per
    interleaved view of the cached frames (their probabilities averaged); otherwise the fixed
    evenly spaced frames."""
    if not views:
        return [fixed_inputs(cache, num_frames)]
    return [select_frames(cache, idx) for idx in view_indices(cached_frames(cache), num_frames)]


def stacked_views(views: list, labels: np.ndarray) -> tuple:
    """(inputs, labels): every view of a split's clips as one set of inputs, each clip once
    per view, and its labels repeated alike (one view: itself). What a model evaluated over
    views (`tta_views`) is validated on while it trains, so that the epoch kept is chosen on
    the frames it is scored on; the validation loss is the mean of the views' losses."""
    if len(views) == 1:
        return views[0], labels
    if isinstance(views[0], dict):
        stacked = {k: np.concatenate([v[k] for v in views]) for k in views[0]}
    else:
        stacked = np.concatenate(views)
    return stacked, np.tile(labels, len(views))


def input_dir(paths: Paths, model: ModelSection) -> Path:
    """The cache a model reads: `paths.frames` or `paths.features` (its `input`)."""
    return resolve(getattr(paths, model.input))


def load_cache(paths: Paths, model: ModelSection, split: str):
    """(cache, labels, clips) of one split, in the order the cache stores them: every cached
    frame of each clip (B x T x S x S x 3, or x 5 with the optical flow the model reads) or,
    for a model on features, {"features": B x T x D (with its pooled flow), "mask": B x T}."""
    directory = input_dir(paths, model) / split
    if model.input == "frames":
        cache, labels = load_arrays(directory, "frames", "labels")
        if model.reads_flow:
            cache = with_flow(cache, *load_arrays(directory, "flow"))  # B,T,S,S,5
    else:
        feats, labels, mask = load_arrays(directory, "features", "labels", "mask")
        if model.reads_flow:  # each frame's optical flow pooled on a grid, after its features
            flow_dir = resolve(paths.frames) / split
            motion = pooled_flow(*load_arrays(flow_dir, "flow"), model.flow_grid)
            feats = np.concatenate([feats, motion.astype(feats.dtype)], axis=-1)
        cache = {"features": feats, "mask": mask}
    clips = pd.read_csv(directory / "clips.csv")
    if len(clips) != len(labels):
        raise ValueError(f"{directory}: {len(labels)} labels but {len(clips)} rows in clips.csv")
    return cache, labels, clips


def load_split(paths: Paths, model: ModelSection, split: str):
    """(inputs, labels, clips) of one split: the model's fixed evenly spaced frames."""
    cache, labels, clips = load_cache(paths, model, split)
    return fixed_inputs(cache, model.num_frames), labels, clips


def mirrored(clips: np.ndarray) -> np.ndarray:
    """The clips followed by their left-right mirror images: B x T x S x S x C -> 2B x ...
    (clips with optical flow, C = 5, get their horizontal flow reversed too)."""
    mirror = clips[:, :, :, ::-1].copy()
    if clips.shape[-1] == RGB_CHANNELS + FLOW_CHANNELS:
        mirror_flow_channels(mirror)
    return np.concatenate([clips, mirror])


def mirror_average(probs: np.ndarray) -> np.ndarray:
    """A model's output on `mirrored` clips as one row per clip: each clip's probabilities
    averaged with its mirror image's (test-time averaging)."""
    half = len(probs) // 2
    return (probs[:half] + probs[half:]) / 2
