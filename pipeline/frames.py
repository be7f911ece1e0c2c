"""Stage `frames`: sample N frames spread over each clip, letterbox them, cache as uint8 arrays.

Outputs one folder per split under `paths.frames`, each with
`frames.npy` (clips x N x size x size x 3, uint8 RGB), `labels.npy` (class index),
`mask.npy` (clips x N, False where a short clip repeats a frame) and `clips.csv` (row order).
Training reads these arrays and never decodes video.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.common import SPLITS, atomic_dir, resolve, save_arrays, stage_cli, write_json_atomic

log = logging.getLogger(__name__)


def sample_indices(total: int, n: int) -> np.ndarray:
    """`n` frame indices spread over a clip of `total` frames: the centre of each of n segments.

    Clips shorter than n repeat frames (each index still inside the clip), never pad with zeros.
    """
    if total < 1 or n < 1:
        raise ValueError(f"cannot sample {n} frames from a clip of {total} frames")
    return np.minimum(((np.arange(n) + 0.5) * total / n).astype(int), total - 1)


def letterbox(frame: np.ndarray, size: int, pad_value: int = 0) -> np.ndarray:
    """Resize to fit a size x size square keeping the aspect ratio; pad the rest."""
    h, w = frame.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (nw, nh), interpolation=interp)
    out = np.full((size, size, frame.shape[2]), pad_value, dtype=frame.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


def sample_frames(path: Path, total: int, n: int, size: int, pad_value: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Decode only the sampled frames of one clip: (n x size x size x 3 RGB uint8, mask n)."""
    indices = sample_indices(total, n)
    wanted = set(indices.tolist())
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise IOError(f"OpenCV cannot open {path}")
    kept: dict[int, np.ndarray] = {}
    try:
        for i in range(int(indices.max()) + 1):
            ok = cap.grab()
            if not ok:
                break
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                kept[i] = letterbox(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size, pad_value)
    finally:
        cap.release()
    lost = sorted(wanted - kept.keys())
    if lost:
        raise IOError(f"{path}: frames {lost} could not be decoded (probe counted {total})")
    frames = np.stack([kept[i] for i in indices])
    mask = np.ones(n, dtype=bool)
    mask[1:] = indices[1:] != indices[:-1]
    return frames, mask


def extract_frames(params: dict) -> None:
    cfg = params["frames"]
    classes = list(params["dataset"]["classes"])
    raw = resolve(params["paths"]["raw"])
    splits = pd.read_csv(resolve(params["paths"]["clean"]) / "splits.csv")
    n, size = int(cfg["num_frames"]), int(cfg["size"])
    with atomic_dir(resolve(params["paths"]["frames"])) as tmp:
        for split in SPLITS:
            rows = splits[splits["split"] == split].reset_index(drop=True)
            frames = np.zeros((len(rows), n, size, size, 3), dtype=np.uint8)
            masks = np.zeros((len(rows), n), dtype=bool)
            for i, rec in enumerate(tqdm(rows.itertuples(), total=len(rows),
                                         desc=f"frames {split}", unit="clip")):
                frames[i], masks[i] = sample_frames(raw / rec.path, int(rec.frames), n, size,
                                                    int(cfg["pad_value"]))
            labels = np.array([classes.index(l) for l in rows["label"]], dtype=np.int64)
            (tmp / split).mkdir()
            save_arrays(tmp / split, frames=frames, labels=labels, mask=masks)
            rows[["path", "label", "group"]].to_csv(tmp / split / "clips.csv", index=False)
        write_json_atomic(tmp / "classes.json", classes)
    log.info("frames: %d clips x %d frames of %dx%d cached in %s", len(splits), n, size, size,
             params["paths"]["frames"])


def main(argv: list[str] | None = None) -> None:
    stage_cli("frames", __doc__.splitlines()[0], lambda p, a: extract_frames(p), argv)


if __name__ == "__main__":
    main()
