"""Frame extraction throughput: the `frames` stage against plain sequential OpenCV decoding.

    .venv/bin/python benchmarks/frame_extraction.py [--source DIR | --sample] [--frames 16]
        [--size 224] [--json FILE]

Both sides decode the same clips and produce the same uint8 arrays (same frame indices, same
letterbox):
- reference: one process, `cv2.VideoCapture.read()` of every frame in order, the sampled ones
  letterboxed and kept as they pass (how a notebook does it);
- stage: `pipeline.stages.frames.extract_frames`, exactly as `dvc repro` runs it (worker processes,
  grab-without-convert for skipped frames, results written through a memory map), without
  optical flow (the same arrays as the reference);
- stage with optical flow (`frames.flow.enabled`, on by default for real footage): what
  the flow costs on top, reported, not compared.
Each side runs in its own fresh process; peak memory is the largest sum of resident memory
of that process and all its worker processes (sampled every 50 ms); the best of `--repeats`
runs is reported. Default source: ../shared/data/real/cricket_shots (real 720p
H.264), else a generated sample. Target: stage >= 1.5x the reference on 2 cores. The rows
and the machine go to `--json` (default `benchmarks/results/frame_extraction.json`, from
which the docs' table is rendered).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu import cpu_description  # noqa: E402  (benchmarks/cpu.py, beside this script)
from results import Column, default_path, save_results  # noqa: E402

COLUMNS = [
    Column("side", ""),
    Column("seconds", "seconds", ".2f"),
    Column("clips_per_s", "clips/s", ".2f"),
    Column("source_frames_per_s", "source frames/s", ".1f"),
    Column("output_frames_per_s", "output frames/s", ".1f"),
    Column("peak_mb", "peak memory, MB (all processes)", ".0f"),
]
NOTES = (
    "reference: one process reading every frame in order with `cv2.VideoCapture.read()`, "
    "keeping the sampled ones; frames stage: `extract_frames` as `dvc repro` runs it, "
    "without optical flow, so that both produce the same arrays (the speed-up compares "
    "these two); + optical flow: the same stage also computing each sampled frame's "
    "Farnebäck flow (`frames.flow.enabled`, what real footage gets by default): its cost."
)
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "real" / "cricket_shots"


def prepare(source: Path | None, frames: int, size: int, root: Path) -> dict:
    """download + clean into the workspace `root` through the real config; returns the params."""
    from pipeline.params import compose_params
    from pipeline.schema import InvalidConfig, parse_params
    from pipeline.stages.clean import clean
    from pipeline.stages.download import run as download

    os.chdir(root)
    overrides = [f"frames.num_frames={frames}", f"frames.size={size}"]
    if source is not None:
        classes = sorted(d.name for d in source.iterdir() if d.is_dir())
        overrides += [
            "dataset=folder",
            f"dataset.path={source}",
            f"dataset.classes=[{','.join(classes)}]",
        ]
    params = compose_params(overrides, conf_dir=ROOT / "conf")
    try:
        config = parse_params(params)
    except InvalidConfig as err:
        sys.exit(f"--frames {frames} --size {size}: {err}")
    download(config)
    clean(config)
    return params


def reference_decode(params: dict) -> int:
    """Sequential read() of every frame, keeping the sampled ones; returns frames decoded."""
    import cv2
    import numpy as np
    import pandas as pd

    from pipeline.config import resolve
    from pipeline.data.video import letterbox, sample_indices

    n, size = int(params["frames"]["num_frames"]), int(params["frames"]["size"])
    raw = resolve(params["paths"]["raw"])
    splits = pd.read_csv(resolve(params["paths"]["clean"]) / "splits.csv")
    out = np.zeros((len(splits), n, size, size, 3), np.uint8)
    decoded = 0
    for i, rec in enumerate(splits.itertuples()):
        wanted = sample_indices(int(rec.frames), n)
        wanted_set = set(wanted.tolist())
        cap = cv2.VideoCapture(str(raw / rec.path))
        kept, j = {}, 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if j in wanted_set:
                kept[j] = letterbox(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size)
            j += 1
        cap.release()
        decoded += j
        out[i] = [kept[k] for k in wanted]
    return decoded


class TreeMemory:
    """Peak resident memory of this process plus all its descendants (the worker processes
    and the forkserver that starts them), sampled every 50 ms in a background thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self.me, self.done = 0, psutil.Process(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        import psutil

        while not self.done.wait(0.05):
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


PARAMS_FILES = {"stage": "params.yaml", "stage_with_flow": "params_with_flow.yaml"}


def run_variant(variant: str, root: Path) -> None:
    """Child process: time one side and print a JSON line."""
    import logging

    from pipeline.config import load_config

    logging.disable(logging.WARNING)
    os.chdir(root)
    config = load_config(root / PARAMS_FILES.get(variant, "params.yaml"))
    memory = TreeMemory()
    start = time.perf_counter()
    if variant == "reference":
        reference_decode(config.composed)
    else:
        from pipeline.stages.frames import run as extract_frames

        extract_frames(config)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": memory.stop()}))


def measure(variant: str, root: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--variant", variant, "--root", str(root)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from pipeline.tensorflow_start import prepare_tensorflow

    prepare_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="folder-per-class videos (default: cricket_shots if present)",
    )
    parser.add_argument(
        "--sample", action="store_true", help="the generated sample, even if cricket_shots is"
    )
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=default_path("frame_extraction"))
    parser.add_argument("--variant", choices=["reference", *PARAMS_FILES], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.json = args.json.resolve()  # before the benchmark changes directory
    args.source = args.source.resolve() if args.source else None
    if args.variant:
        run_variant(args.variant, args.root)
        return

    import logging

    import pandas as pd
    import yaml

    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    source = args.source or (DEFAULT_SOURCE if DEFAULT_SOURCE.is_dir() else None)
    if args.sample:
        source = None
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        root = Path(tmp)
        params = prepare(source, args.frames, args.size, root)
        with_flow = copy.deepcopy(params)
        with_flow["frames"]["flow"]["enabled"] = True
        without_flow(params)  # the same arrays as the reference
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        (root / "params_with_flow.yaml").write_text(yaml.safe_dump(with_flow))
        splits = pd.read_csv(root / params["paths"]["clean"] / "splits.csv")
        clips, source_frames = len(splits), int(splits["frames"].sum())
        from pipeline.parallel import worker_count

        workers = worker_count(params.get("workers"))
        reference_decode(params)  # warm the page cache so neither side pays the first read
        results = {
            v: min((measure(v, root) for _ in range(args.repeats)), key=lambda r: r["seconds"])
            for v in ("reference", *PARAMS_FILES)
        }
    description = (
        f"{clips} clips ({source_frames} source frames, up to "
        f"{splits['width'].max()}×{splits['height'].max()}) from "
        f"{source_label(source)}; {args.frames} frames of {args.size}×{args.size} per clip; "
        f"stage workers {workers}; best of {args.repeats} runs"
    )
    rows = [
        {
            "side": label,
            "seconds": results[name]["seconds"],
            "clips_per_s": clips / results[name]["seconds"],
            "source_frames_per_s": source_frames / results[name]["seconds"],
            "output_frames_per_s": clips * args.frames / results[name]["seconds"],
            "peak_mb": results[name]["peak_mb"],
        }
        for name, label in (
            ("reference", "sequential OpenCV (reference)"),
            ("stage", "frames stage"),
            ("stage_with_flow", "frames stage + optical flow (not compared)"),
        )
    ]
    speedup = results["reference"]["seconds"] / results["stage"]["seconds"]
    print(f"frame extraction: {description}; {cpu_description()}")
    print(
        f"{'':30}{'seconds':>9}{'clips/s':>9}{'src frames/s':>14}{'out frames/s':>14}"
        f"{'peak MB (all processes)':>25}"
    )
    for r in rows:
        print(
            f"{r['side']:30}{r['seconds']:9.2f}{r['clips_per_s']:9.2f}"
            f"{r['source_frames_per_s']:14.1f}{r['output_frames_per_s']:14.1f}{r['peak_mb']:25.0f}"
        )
    print(f"speed-up: {speedup:.2f}x (target >= 1.5x)")
    save_results(
        args.json,
        "frame_extraction",
        f"{description}. **Speed-up of the stage: {speedup:.2f}×** (target ≥ 1.5×).",
        COLUMNS,
        rows,
        NOTES,
        speedup=speedup,
    )


def without_flow(params: dict) -> None:
    """No optical flow in the frames stage, and so none read by a model (the schema refuses
    a model on flow that the stage does not cache)."""
    params["frames"]["flow"]["enabled"] = False
    for model in params["models"].values():
        if "motion" in model:
            model["motion"] = "rgb"
        if model.get("flow_grid"):
            model["flow_grid"] = 0


def source_label(source: Path | None) -> str:
    if source is None:
        return "the generated sample"
    try:
        return str(source.resolve().relative_to(ROOT.parent))
    except ValueError:
        return source.name


if __name__ == "__main__":
    main()
