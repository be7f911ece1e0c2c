"""Inference latency and throughput per model on this CPU, from video file to probabilities.

    .venv/bin/python benchmarks/inference_latency.py [--clips 12] [--repeats 3] [--model URI ...]
        [--videos FOLDER] [--json FILE]

For each model the pipeline logged (reports/<model>/mlflow.json, after `dvc repro`), or each
`--model` URI, on the first `--clips` test clips (data/raw), or on the first `--clips` videos
of FOLDER (e.g. real broadcast footage, ../shared/data/real/cricket_shots):

- latency of one clip, end to end (`classify_clips` on one file): decode + preprocess (frame
  count, sampling, letterbox), feature backbone (cnn_gru) and model, each timed separately;
- throughput of a batch of files (`classify_clips` on all of them, 8 clips per forward pass);
- the raw forward pass on already preprocessed inputs, batch 1, measured in the same run:
  the reference the end-to-end figures are compared with;
- for models on features (cnn_gru), once per `features.runtime` x `features.precision`
  (keras/openvino x float32/bfloat16; the logged model's own setting is marked *), with the
  largest relative difference of the clip's features from Keras float32's;
- for models on frames (frame_cnn, cnn3d), once per runtime of the classifier itself (Keras,
  then OpenVINO float32, what `predict` and serving use by default;
  HANDBALL_INFERENCE_RUNTIME=keras keeps Keras).

Timings are medians over `--repeats` passes after one warm-up pass. The rows and the machine
go to `--json` (default `benchmarks/results/inference_latency.json`; the docs render
`inference_latency.json` and `inference_latency_cricket_shots.json`, the same benchmark with
`--videos ../shared/data/real/cricket_shots`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from cpu import cpu_description  # noqa: E402  (benchmarks/cpu.py, beside this script)
from results import Column, default_path, save_results  # noqa: E402

COLUMNS = [
    Column("model", "model, runtime (* as logged)"),
    Column("frames", "frames"),
    Column("decode_ms", "decode + sample, ms", ".1f"),
    Column("backbone_ms", "ResNet101V2 features, ms", ".1f"),
    Column("forward_ms", "forward pass, ms", ".1f"),
    Column("latency_ms", "one file end to end, ms", ".1f"),
    Column("clips_per_s", "batched, clips/s", ".1f"),
    Column("feature_diff", "feature difference", ".1e"),
]
NOTES = (
    "decode: count, sample and letterbox one clip; features: cnn_gru's ResNet101V2 backbone; "
    "forward: the classifier alone on preprocessed input (batch 1); one file: "
    "`classify_clips` on one clip; batched: files per second through `classify_clips`, 8 "
    "clips per forward pass; feature difference: the largest relative difference from Keras "
    "float32's features."
)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `fn()` over `repeats` calls after one warm-up call, and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


SETTINGS = [(r, p) for r in ("keras", "openvino") for p in ("float32", "bfloat16")]


def measure(uri: str, clips: list[Path], repeats: int, setting: tuple) -> dict:
    """Timings of model `uri` with `setting`: (runtime, precision) of the feature backbone for
    models on features, replacing the recorded one; (runtime,) of the classifier itself for
    models on frames."""
    import numpy as np

    from pipeline.models.runtimes import INFERENCE_RUNTIME_VARIABLE
    from pipeline.serving.classifier import VideoClassifier
    from pipeline.serving.clips import clip_frames
    from pipeline.serving.pyfunc import load_video_classifier

    os.environ[INFERENCE_RUNTIME_VARIABLE] = setting[0]
    classifier, _ = load_video_classifier(uri)
    feats = classifier.pre.get("features")
    logged = feats and (feats.get("runtime", "keras"), feats.get("precision", "float32"))
    if feats:  # loading built the recorded backbone: a new classifier builds the one asked for
        features = {**feats, "runtime": setting[0], "precision": setting[1]}
        pre = {**classifier.pre, "features": features}
        classifier = VideoClassifier(classifier.model, pre, classifier.backbone_weights)
    one = clips[:1]
    decode_s, (frames, mask) = timed(lambda: clip_frames(one[0], classifier.pre), repeats)
    frames, mask = frames[None], mask[None]
    prep_s, (inputs, *_) = timed(lambda: classifier.model_inputs(frames, mask), repeats)
    forward_s, _ = timed(lambda: classifier.runner().predict_on_batch(inputs), repeats)
    used = classifier.backbone_runtime if feats else (classifier.runtime,)
    label = " ".join([classifier.pre["model"], *used]) + ("*" if feats and used == logged else "")
    latency_s, _ = timed(lambda: list(classifier.classify_clips(one)), repeats)
    batch_s, results = timed(lambda: list(classifier.classify_clips(clips)), repeats)
    assert all(probs is not None for _, probs, _ in results), "a benchmark clip did not decode"
    return {
        "model": label,
        "features": np.asarray(inputs["features"]) if isinstance(inputs, dict) else None,
        "decode_ms": 1000 * decode_s,
        "backbone_ms": 1000 * prep_s if "features" in classifier.pre else 0.0,
        "forward_ms": 1000 * forward_s,
        "latency_ms": 1000 * latency_s,
        "clips_per_s": len(clips) / batch_s,
        "forward_share": forward_s / latency_s,
        "frames": int(np.asarray(frames).shape[1]),
    }


def main() -> None:
    from pipeline.tensorflow_start import prepare_tensorflow

    prepare_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", action="append", help="MLflow model URI (repeatable)")
    parser.add_argument("--videos", type=Path, help="a folder of videos to time instead")
    parser.add_argument("--json", type=Path, default=default_path("inference_latency"))
    args = parser.parse_args()
    args.json = args.json.resolve()  # before the benchmark changes directory
    videos = args.videos.resolve() if args.videos else None  # before moving to the project
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)

    import pandas as pd

    from pipeline.config import load_params, resolve
    from pipeline.serving.predict import use_project_store

    use_project_store()
    params = load_params()
    reports = resolve(params["paths"]["reports"])
    uris = args.model or [
        json.loads((reports / m / "mlflow.json").read_text())["model_uri"]
        for m in params["models"]
        if (reports / m / "mlflow.json").is_file()
    ]
    if not uris:
        sys.exit("no logged models: run `dvc repro` first or pass --model URI")
    if videos:
        from pipeline.serving.clips import video_paths

        clips = video_paths(videos)[: args.clips]
        source = str(args.videos)
    else:
        test = pd.read_csv(resolve(params["paths"]["clean"]) / "splits.csv").query(
            "split == 'test'"
        )
        clips = [resolve(params["paths"]["raw"]) / p for p in test["path"].head(args.clips)]
        source = f"the test split in {params['paths']['raw']}"
    description = (
        f"{len(clips)} clips from {source}, medians of {args.repeats} passes after a warm-up; "
        "each model with Keras first (the reference), then as `predict` and serving run it"
    )
    print(f"{description}; {cpu_description()}")
    print(
        f"{'model':28} {'frames':>6} {'decode':>9} {'backbone':>9} {'forward':>9} "
        f"{'latency':>9} {'forward/latency':>15} {'batched':>12} {'feature diff':>12}"
    )
    table = []
    for uri in uris:
        # every setting, Keras (float32) first: the reference of the rows below it
        rows = [measure(uri, clips, args.repeats, SETTINGS[0])]
        others = SETTINGS[1:] if rows[0]["features"] is not None else [("openvino",)]
        rows += [measure(uri, clips, args.repeats, setting) for setting in others]
        reference = rows[0]["features"]
        for r in rows:
            features = r.pop("features")
            if features is not None:
                r["feature_diff"] = float(abs(features - reference).max() / abs(reference).max())
            print(
                f"{r['model']:28} {r['frames']:6d} {r['decode_ms']:7.1f}ms "
                f"{r['backbone_ms']:7.1f}ms {r['forward_ms']:7.1f}ms {r['latency_ms']:7.1f}ms "
                f"{r['forward_share']:15.0%} {r['clips_per_s']:7.2f} clip/s "
                f"{r.get('feature_diff', float('nan')):12.1e}"
            )
            table.append(r)
    print(NOTES)
    save_results(args.json, "inference_latency", description, COLUMNS, table, NOTES)


if __name__ == "__main__":
    main()
