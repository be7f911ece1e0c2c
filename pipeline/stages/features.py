"""Stage `features`: ResNet101V2 (`pooling="avg"`) features of every cached frame, in batches.

With `features.motion: true` each frame also gets the features of its change since the previous
frame (a second, motion stream through the same backbone, as in two-stream action recognition),
appended: 4096-d per frame.

Outputs one folder per split under `paths.features`: `features.npy` (clips x N x D, float32),
`labels.npy`, `mask.npy` and `clips.csv` (copied from the frames cache, row order unchanged),
and `runtime.json`: the `features.runtime` and `features.precision` that computed them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.common import (
    SPLITS,
    atomic_dir,
    resolve,
    seed_everything,
    stage_cli,
    write_json_atomic,
)
from pipeline.data.arrays import load_arrays, save_arrays
from pipeline.models.backbones import build_feature_backbone, feature_width, frame_features

log = logging.getLogger(__name__)


def augmented_features(
    backbone,
    preprocess,
    frames: np.ndarray,
    mask: np.ndarray,
    copies: int,
    params: dict,
    directory: Path,
) -> None:
    """Features of `copies` augmented versions of every training clip, for oversampling:
    `aug_features.npy` (clips x copies x N x D) and `aug_mask.npy` (clips x copies x N)."""
    from pipeline.data.augment import augment_clip

    clips, n = frames.shape[:2]
    motion = bool(params["features"].get("motion"))
    dim = feature_width(backbone, motion)
    out = np.lib.format.open_memmap(
        directory / "aug_features.npy", mode="w+", dtype=np.float32, shape=(clips, copies, n, dim)
    )
    masks = np.zeros((clips, copies, n), dtype=bool)
    pad = int(params["frames"]["pad_value"])
    for i in tqdm(range(clips), desc="augmented train features", unit="clip"):
        rng = np.random.default_rng([int(params["seed"]), i])
        versions = [
            augment_clip(frames[i], mask[i], params["augment"], rng, pad) for _ in range(copies)
        ]
        masks[i] = np.stack([m for _, m in versions])
        frame_features(
            backbone,
            preprocess,
            np.stack([f for f, _ in versions]),
            int(params["features"]["batch_size"]),
            desc="",
            out=out[i],
            motion=motion,
        )
    out.flush()
    save_arrays(directory, aug_mask=masks)


def extract_features(params: dict) -> None:
    cfg = params["features"]
    size = int(params["frames"]["size"])
    copies = int(cfg.get("augmented_copies") or 0)
    seed_everything(int(params["seed"]))  # `weights: null` means a seeded random init
    backbone, preprocess, (runtime, precision) = build_feature_backbone(cfg, size)
    frames_dir = resolve(params["paths"]["frames"])
    motion = bool(cfg.get("motion"))
    dim = feature_width(backbone, motion)
    total = 0
    with atomic_dir(resolve(params["paths"]["features"])) as tmp:
        for split in SPLITS:
            frames, labels, mask = load_arrays(
                frames_dir / split, "frames", "labels", "mask", mmap_mode="r"
            )
            (tmp / split).mkdir()
            out = np.lib.format.open_memmap(
                tmp / split / "features.npy",
                mode="w+",
                dtype=np.float32,
                shape=frames.shape[:2] + (dim,),
            )
            frame_features(
                backbone,
                preprocess,
                frames,
                int(cfg["batch_size"]),
                desc=f"features {split}",
                out=out,
                motion=motion,
            )
            out.flush()
            del out
            save_arrays(tmp / split, labels=labels, mask=mask)
            if split == "train" and copies > 0:
                augmented_features(backbone, preprocess, frames, mask, copies, params, tmp / split)
            shutil.copy2(frames_dir / split / "clips.csv", tmp / split / "clips.csv")
            total += frames.shape[0] * frames.shape[1]
        shutil.copy2(frames_dir / "classes.json", tmp / "classes.json")
        # what actually computed them (after any fallback): a logged cnn_gru serves with it
        write_json_atomic(tmp / "runtime.json", {"runtime": runtime, "precision": precision})
    log.info(
        "features: %d frames -> %d-d %s features (%s, %s)%s in %s%s",
        total,
        dim,
        cfg["backbone"],
        runtime,
        precision,
        " (appearance + motion streams)" if motion else "",
        params["paths"]["features"],
        f" (+ {copies} augmented copies of each training clip)" if copies else "",
    )


def main(argv: list[str] | None = None) -> None:
    stage_cli("features", __doc__.splitlines()[0], lambda p, a: extract_features(p), argv)


if __name__ == "__main__":
    main()
