"""Feature caching throughput: every `features.runtime` x `features.precision`, side by side
with stock Keras float32, and the `features` stage's loop against each runtime's raw forward pass.

    .venv/bin/python benchmarks/feature_caching.py [--clips 16] [--frames 16] [--size 224]
        [--json FILE]

Same seeded ResNet101V2 (`pooling="avg"`, random init: speed does not depend on the weights),
same frames, same batch size (`features.batch_size`), built by `build_feature_backbone` as the
stage builds it. Per setting:
- raw: `backbone.predict_on_batch(preprocess(batch))` over an in-memory float array, batch
  after batch, results kept in memory (the fastest plain loop for that runtime);
- stage: `pipeline.models.backbones.frame_features` as the stage calls it, reading the uint8
  frames through a memory map and writing features into a memory-mapped `.npy`.
Printed: frames/s of both, raw speed-up over Keras float32 (the reference), the largest
relative difference of the features from Keras float32, and stage/raw (target >= 0.9x: the
stage's own overhead <= 10 %). All warmed up first; best of `--repeats`. The CPU's bfloat16
flags are printed: without AVX512-BF16/AMX, bfloat16 settings fall back to float32. The
rows and the machine go to `--json` (default `benchmarks/results/feature_caching.json`, from
which the docs' table is rendered).

The CPU's ceiling is printed too: OpenVINO's throughput on a chain of large matrix products
(GMAC/s, float32 and bfloat16), against which each setting's achieved GMAC/s (the backbone's
convolution multiply-accumulates per frame x frames/s) is a percentage; "bf16 ceiling / keras
f32" is the largest speed-up bfloat16 arithmetic can give over the reference on this CPU.
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

from cpu import cpu_description  # noqa: E402  (benchmarks/cpu.py, beside this script)
from results import Column, default_path, save_results  # noqa: E402

COLUMNS = [
    Column("setting", "setting (as run)"),
    Column("raw_fps", "raw frames/s", ".1f"),
    Column("stage_fps", "stage frames/s", ".1f"),
    Column("speedup", "× Keras float32 (raw)", ".2f"),
    Column("max_rel_diff", "largest relative difference", ".1e"),
    Column("stage_over_raw", "stage / raw (target ≥ 0.9)", ".2f"),
    Column("gmac_per_s", "GMAC/s", ".0f"),
    Column("share_of_ceiling", "share of the ceiling", ".0%"),
    Column("ceiling", "of the ceiling in"),
]
NOTES = (
    "raw: `predict_on_batch` over an in-memory float array; stage: the features stage's loop "
    "(memory-mapped frames in, memory-mapped features out); × Keras float32: raw speed-up "
    "over the reference; largest relative difference: of the features from Keras float32's."
)


def conv_gmac_per_frame(model) -> float:
    """Multiply-accumulates of every Conv2D of a Keras model for one input, in billions."""
    import keras
    import numpy as np

    macs = 0
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, _ = layer.output.shape
            macs += int(np.prod(layer.kernel.shape)) * height * width
    return macs / 1e9


def matmul_gmac_per_s(precision: str, n: int = 2048, chain: int = 8, repeats: int = 5) -> float:
    """OpenVINO's CPU throughput on `chain` products of n x n matrices at an inference
    precision (`f32` | `bf16`): what the CPU's vector units give at best, in GMAC/s."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = inp = ops.parameter([n, n], np.float32)
    weights = ops.constant(rng.standard_normal((n, n)).astype(np.float32))
    for _ in range(chain):
        x = ops.matmul(x, weights, False, False)
    compiled = ov.Core().compile_model(
        ov.Model([x], [inp]), "CPU", {"INFERENCE_PRECISION_HINT": precision}
    )
    request = compiled.create_infer_request()
    data = (rng.standard_normal((n, n)) * 0.01).astype(np.float32)
    request.infer({0: data})  # warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer({0: data})
        best = min(best, time.perf_counter() - start)
    return chain * n**3 / best / 1e9


def main() -> None:
    from pipeline.tensorflow_start import prepare_tensorflow

    prepare_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=default_path("feature_caching"))
    args = parser.parse_args()
    args.json = args.json.resolve()  # before the benchmark changes directory
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["TQDM_DISABLE"] = "1"

    import numpy as np

    from pipeline.models.backbones import build_feature_backbone, frame_features
    from pipeline.models.runtimes import cpu_has_bfloat16
    from pipeline.models.seeding import seed_everything

    shape = (args.size, args.size, 3)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.clips, args.frames) + shape, dtype=np.uint8)
    bs, total = args.batch_size, args.clips * args.frames
    settings = [(r, p) for r in ("keras", "openvino") for p in ("float32", "bfloat16")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        np.save(Path(tmp) / "frames.npy", frames)
        mapped = np.load(Path(tmp) / "frames.npy", mmap_mode="r")
        for runtime, precision in settings:
            seed_everything(0)
            cfg = {"backbone": "resnet101v2", "weights": None}
            backbone, preprocess, used = build_feature_backbone(
                {**cfg, "runtime": runtime, "precision": precision}, args.size
            )

            def raw(backbone=backbone, preprocess=preprocess) -> np.ndarray:
                flat = frames.reshape((total,) + shape).astype(np.float32)
                outs = []
                for start in range(0, total, bs):
                    batch = np.zeros((bs,) + shape, np.float32)
                    chunk = flat[start : start + bs]
                    batch[: len(chunk)] = chunk
                    outs.append(
                        np.asarray(backbone.predict_on_batch(preprocess(batch)))[: len(chunk)]
                    )
                return np.concatenate(outs).astype(np.float32)

            def stage(backbone=backbone, preprocess=preprocess) -> np.ndarray:
                out = np.lib.format.open_memmap(
                    Path(tmp) / "features.npy",
                    mode="w+",
                    dtype=np.float32,
                    shape=(args.clips, args.frames, backbone.output_shape[-1]),
                )
                frame_features(backbone, preprocess, mapped, bs, out=out)
                out.flush()
                return np.array(out).reshape(total, -1)

            if (runtime, precision) == ("keras", "float32"):
                gmac = conv_gmac_per_frame(backbone)
            backbone.predict_on_batch(preprocess(np.zeros((bs,) + shape, np.float32)))  # warm
            times = {"raw": [], "stage": []}
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
                for name, fn in (("raw", raw), ("stage", stage)):
                    start = time.perf_counter()
                    out = fn()
                    times[name].append(time.perf_counter() - start)
            results[(runtime, precision)] = (used, {k: min(v) for k, v in times.items()}, out)
            del backbone

    reference = results[("keras", "float32")]
    flags = "AVX512-BF16/AMX: yes" if cpu_has_bfloat16() else "no bfloat16 instructions"
    ceiling = {"float32": matmul_gmac_per_s("f32"), "bfloat16": matmul_gmac_per_s("bf16")}
    rows = []
    for (runtime, precision), (used, best, out) in results.items():
        achieved = gmac * total / best["raw"]
        rows.append(
            {
                "setting": f"{runtime} {precision}"
                + ("" if used == (runtime, precision) else f" (runs as {used[0]} {used[1]})"),
                "raw_fps": total / best["raw"],
                "stage_fps": total / best["stage"],
                "speedup": reference[1]["raw"] / best["raw"],
                "max_rel_diff": float(
                    np.abs(out - reference[2]).max() / np.abs(reference[2]).max()
                ),
                "stage_over_raw": best["raw"] / best["stage"],
                "gmac_per_s": achieved,
                "share_of_ceiling": achieved / ceiling[used[1]],
                "ceiling": used[1],
            }
        )
    print(
        f"feature caching: ResNet101V2 avg-pool, {total} frames of {args.size}x{args.size}, "
        f"batch {bs}; {cpu_description()}; {flags}"
    )
    print(
        f"{'setting (as run)':40}{'raw fps':>9}{'stage fps':>10}{'x keras f32':>12}"
        f"{'max rel diff':>14}{'stage/raw':>11}{'GMAC/s':>8}{'ceiling':>9}"
    )
    for r in rows:
        print(
            f"{r['setting']:40}{r['raw_fps']:9.1f}{r['stage_fps']:10.1f}{r['speedup']:12.2f}"
            f"{r['max_rel_diff']:14.1e}{r['stage_over_raw']:11.2f}{r['gmac_per_s']:8.0f}"
            f"{r['share_of_ceiling']:9.0%}"
        )
    best_over_reference = ceiling["bfloat16"] / rows[0]["gmac_per_s"]
    summary = (
        f"CPU ceiling (OpenVINO's chained matrix products): float32 {ceiling['float32']:.0f} "
        f"GMAC/s, bfloat16 {ceiling['bfloat16']:.0f} GMAC/s; ResNet101V2 costs {gmac:.2f} GMAC "
        f"per frame; the bfloat16 ceiling over Keras float32: {best_over_reference:.2f}× (the "
        "most bfloat16 arithmetic can speed up the reference on this CPU)."
    )
    print(summary)
    print("reference: keras float32 raw forward pass; stage/raw target >= 0.9")
    save_results(
        args.json,
        "feature_caching",
        f'ResNet101V2 (`pooling="avg"`, random init) on {total} frames of '
        f"{args.size}×{args.size}, batch {bs}, best of {args.repeats}; {flags}. {summary}",
        COLUMNS,
        rows,
        NOTES,
        ceiling_gmac_per_s=ceiling,
        gmac_per_frame=gmac,
    )


if __name__ == "__main__":
    main()
