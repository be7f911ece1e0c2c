"""Stage `features`: ResNet101V2 (`pooling="avg"`) features of every cached frame, in batches.

Outputs one folder per split under `paths.features`: `features.npy` (clips x N x 2048, float32),
`labels.npy`, `mask.npy` and `clips.csv` (copied from the frames cache, row order unchanged).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
from tqdm import tqdm

from pipeline.backbones import build_backbone, preprocess_for
from pipeline.common import (SPLITS, atomic_dir, load_arrays, resolve, save_arrays,
                             seed_everything, stage_cli)

log = logging.getLogger(__name__)


def frame_features(backbone, preprocess, frames: np.ndarray, batch_size: int,
                   desc: str = "features") -> np.ndarray:
    """(clips x N x H x W x 3 uint8) -> (clips x N x D float32), batch_size frames at a time."""
    clips, n = frames.shape[:2]
    flat = frames.reshape((clips * n,) + frames.shape[2:])
    dim = backbone.output_shape[-1]
    out = np.zeros((clips * n, dim), dtype=np.float32)
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch"):
        chunk = flat[start:start + batch_size]
        batch = np.zeros((batch_size,) + flat.shape[1:], dtype=np.float32)
        batch[:len(chunk)] = chunk  # a fixed batch shape avoids retracing for the last batch
        out[start:start + len(chunk)] = backbone.predict_on_batch(preprocess(batch))[:len(chunk)]
    return out.reshape(clips, n, dim)


def extract_features(params: dict) -> None:
    cfg = params["features"]
    size = int(params["frames"]["size"])
    seed_everything(int(params["seed"]))  # `weights: null` means a seeded random init
    backbone = build_backbone(cfg["backbone"], cfg["weights"], (size, size, 3),
                              config_key="features.weights", pooling="avg")
    preprocess = preprocess_for(cfg["backbone"])
    frames_dir = resolve(params["paths"]["frames"])
    total = 0
    with atomic_dir(resolve(params["paths"]["features"])) as tmp:
        for split in SPLITS:
            frames, labels, mask = load_arrays(frames_dir / split, "frames", "labels", "mask")
            feats = frame_features(backbone, preprocess, frames, int(cfg["batch_size"]),
                                   desc=f"features {split}")
            (tmp / split).mkdir()
            save_arrays(tmp / split, features=feats, labels=labels, mask=mask)
            shutil.copy2(frames_dir / split / "clips.csv", tmp / split / "clips.csv")
            total += frames.shape[0] * frames.shape[1]
        shutil.copy2(frames_dir / "classes.json", tmp / "classes.json")
    log.info("features: %d frames -> %d-d %s features in %s", total,
             backbone.output_shape[-1], cfg["backbone"], params["paths"]["features"])


def main(argv: list[str] | None = None) -> None:
    stage_cli("features", __doc__.splitlines()[0], lambda p, a: extract_features(p), argv)


if __name__ == "__main__":
    main()
