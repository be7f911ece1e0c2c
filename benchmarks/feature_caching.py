"""Feature caching throughput: the `features` stage's loop against the raw batched forward pass.

    .venv/bin/python benchmarks/feature_caching.py [--clips 16] [--frames 16] [--size 224]

Same ResNet101V2 (`pooling="avg"`, random init: speed does not depend on the weights), same
frames, same batch size (`features.batch_size`):
- reference: `backbone.predict_on_batch(preprocess(batch))` over an in-memory float array,
  batch after batch, results kept in memory (the fastest plain Keras loop);
- stage: `pipeline.models.backbones.frame_features` as the stage calls it, reading the uint8 frames
  through a memory map and writing features into a memory-mapped `.npy`.
Both are warmed up (graph traced) first; best of `--repeats`. Target: stage >= 0.9x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TQDM_DISABLE"] = "1"

    import numpy as np

    from pipeline.common import seed_everything
    from pipeline.models.backbones import build_backbone, frame_features, preprocess_for

    seed_everything(0)
    shape = (args.size, args.size, 3)
    backbone = build_backbone(
        "resnet101v2", None, shape, config_key="features.weights", pooling="avg"
    )
    preprocess = preprocess_for("resnet101v2")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.clips, args.frames) + shape, dtype=np.uint8)
    bs, total = args.batch_size, args.clips * args.frames

    def reference() -> np.ndarray:
        flat = frames.reshape((total,) + shape).astype(np.float32)
        outs = []
        for start in range(0, total, bs):
            batch = np.zeros((bs,) + shape, np.float32)
            chunk = flat[start : start + bs]
            batch[: len(chunk)] = chunk
            outs.append(backbone.predict_on_batch(preprocess(batch))[: len(chunk)])
        return np.concatenate(outs)

    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        np.save(Path(tmp) / "frames.npy", frames)
        mapped = np.load(Path(tmp) / "frames.npy", mmap_mode="r")

        def stage() -> np.ndarray:
            out = np.lib.format.open_memmap(
                Path(tmp) / "features.npy",
                mode="w+",
                dtype=np.float32,
                shape=(args.clips, args.frames, backbone.output_shape[-1]),
            )
            frame_features(backbone, preprocess, mapped, bs, out=out)
            out.flush()
            return out

        backbone.predict_on_batch(preprocess(np.zeros((bs,) + shape, np.float32)))  # trace
        times = {"reference": [], "stage": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
            for name, fn in (("reference", reference), ("stage", stage)):
                start = time.perf_counter()
                result = fn()
                times[name].append(time.perf_counter() - start)
        same = np.allclose(np.asarray(result).reshape(total, -1), reference(), atol=1e-4)

    print(
        f"feature caching: ResNet101V2 avg-pool, {total} frames of {args.size}x{args.size}, "
        f"batch {bs}; {os.cpu_count()} CPUs; outputs equal: {same}"
    )
    print(f"{'':34}{'seconds':>9}{'frames/s':>10}")
    best = {k: min(v) for k, v in times.items()}
    for name, label in (
        ("reference", "raw batched forward pass (ref.)"),
        ("stage", "features stage loop"),
    ):
        print(f"{label:34}{best[name]:9.2f}{total / best[name]:10.1f}")
    print(f"ratio: {best['reference'] / best['stage']:.2f}x of the reference (target >= 0.9x)")


if __name__ == "__main__":
    main()
