"""Stage `features`: ResNet101V2 (`pooling="avg"`) features of every cached frame, in batches.

With `features.motion: true` each frame also gets the features of its change since the previous
frame (a second, motion stream through the same backbone, as in two-stream action recognition),
appended: 4096-d per frame.

Outputs one folder per split under `paths.features`: `features.npy` (clips x N x D, float32),
`labels.npy`, `mask.npy` and `clips.csv` (copied from the frames cache, row order unchanged).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.backbones import build_backbone, preprocess_for
from pipeline.common import (SPLITS, atomic_dir, load_arrays, resolve, save_arrays,
                             seed_everything, stage_cli)

log = logging.getLogger(__name__)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """(clips x N x H x W x 3 uint8) -> float32 images of each frame's change since the
    previous one, centred on mid-grey (127.5; the first frame and repeats show no change)."""
    f = np.asarray(frames, dtype=np.float32)
    change = np.zeros_like(f)
    change[:, 1:] = f[:, 1:] - f[:, :-1]
    return change * 0.5 + 127.5


def feature_width(backbone, motion: bool) -> int:
    """The width of one frame's features: the backbone's, twice that with the motion stream."""
    return backbone.output_shape[-1] * (2 if motion else 1)


def frame_features(backbone, preprocess, frames: np.ndarray, batch_size: int,
                   desc: str = "features", out: np.ndarray | None = None,
                   motion: bool = False) -> np.ndarray:
    """(clips x N x H x W x 3 uint8) -> (clips x N x D float32), batch_size frames at a time;
    with `motion`, D is twice the backbone's width: the features of `frame_changes` follow.

    `frames` may be a memory map and `out` a preallocated (memory-mapped) result: only one
    batch of frames (or a few clips' changes) is in memory at a time. An empty `desc` hides the
    progress bar (callers with their own bar over clips).
    """
    if motion:
        clips, n = frames.shape[:2]
        dim = backbone.output_shape[-1]
        if out is None:
            out = np.zeros((clips, n, 2 * dim), dtype=np.float32)
        step = max(1, batch_size // n)  # clips per pass: about one batch of frames
        for start in tqdm(range(0, clips, step), desc=desc and f"{desc} (+motion)", unit="pass",
                          disable=not desc):
            part = frames[start:start + step]
            out[start:start + step, :, :dim] = frame_features(backbone, preprocess, part,
                                                              batch_size, desc="")
            out[start:start + step, :, dim:] = frame_features(
                backbone, preprocess, frame_changes(part), batch_size, desc="")
        return out
    clips, n = frames.shape[:2]
    flat = frames.reshape((clips * n,) + frames.shape[2:])
    dim = backbone.output_shape[-1]
    if out is None:
        out = np.zeros((clips, n, dim), dtype=np.float32)
    flat_out = out.reshape(clips * n, dim)
    batch = np.zeros((batch_size,) + flat.shape[1:], dtype=np.float32)
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch", disable=not desc):
        chunk = flat[start:start + batch_size]
        batch[:len(chunk)] = chunk  # a fixed batch shape avoids retracing for the last batch
        batch[len(chunk):] = 0
        flat_out[start:start + len(chunk)] = backbone.predict_on_batch(
            preprocess(batch.copy()))[:len(chunk)]
    return out


def augmented_features(backbone, preprocess, frames: np.ndarray, mask: np.ndarray,
                       copies: int, params: dict, directory: Path) -> None:
    """Features of `copies` augmented versions of every training clip, for oversampling:
    `aug_features.npy` (clips x copies x N x D) and `aug_mask.npy` (clips x copies x N)."""
    from pipeline.augment import augment_clip

    clips, n = frames.shape[:2]
    motion = bool(params["features"].get("motion"))
    dim = feature_width(backbone, motion)
    out = np.lib.format.open_memmap(directory / "aug_features.npy", mode="w+", dtype=np.float32,
                                    shape=(clips, copies, n, dim))
    masks = np.zeros((clips, copies, n), dtype=bool)
    pad = int(params["frames"]["pad_value"])
    for i in tqdm(range(clips), desc="augmented train features", unit="clip"):
        rng = np.random.default_rng([int(params["seed"]), i])
        versions = [augment_clip(frames[i], mask[i], params["augment"], rng, pad)
                    for _ in range(copies)]
        masks[i] = np.stack([m for _, m in versions])
        frame_features(backbone, preprocess, np.stack([f for f, _ in versions]),
                       int(params["features"]["batch_size"]), desc="", out=out[i], motion=motion)
    out.flush()
    save_arrays(directory, aug_mask=masks)


def extract_features(params: dict) -> None:
    cfg = params["features"]
    size = int(params["frames"]["size"])
    copies = int(cfg.get("augmented_copies") or 0)
    seed_everything(int(params["seed"]))  # `weights: null` means a seeded random init
    backbone = build_backbone(cfg["backbone"], cfg["weights"], (size, size, 3),
                              config_key="features.weights", pooling="avg")
    preprocess = preprocess_for(cfg["backbone"])
    frames_dir = resolve(params["paths"]["frames"])
    motion = bool(cfg.get("motion"))
    dim = feature_width(backbone, motion)
    total = 0
    with atomic_dir(resolve(params["paths"]["features"])) as tmp:
        for split in SPLITS:
            frames, labels, mask = load_arrays(frames_dir / split, "frames", "labels", "mask",
                                               mmap_mode="r")
            (tmp / split).mkdir()
            out = np.lib.format.open_memmap(tmp / split / "features.npy", mode="w+",
                                            dtype=np.float32,
                                            shape=frames.shape[:2] + (dim,))
            frame_features(backbone, preprocess, frames, int(cfg["batch_size"]),
                           desc=f"features {split}", out=out, motion=motion)
            out.flush()
            del out
            save_arrays(tmp / split, labels=labels, mask=mask)
            if split == "train" and copies > 0:
                augmented_features(backbone, preprocess, frames, mask, copies, params, tmp / split)
            shutil.copy2(frames_dir / split / "clips.csv", tmp / split / "clips.csv")
            total += frames.shape[0] * frames.shape[1]
        shutil.copy2(frames_dir / "classes.json", tmp / "classes.json")
    log.info("features: %d frames -> %d-d %s features%s in %s%s", total, dim, cfg["backbone"],
             " (appearance + motion streams)" if motion else "", params["paths"]["features"],
             f" (+ {copies} augmented copies of each training clip)" if copies else "")


def main(argv: list[str] | None = None) -> None:
    stage_cli("features", __doc__.splitlines()[0], lambda p, a: extract_features(p), argv)


if __name__ == "__main__":
    main()
