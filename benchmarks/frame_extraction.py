"""Frame extraction throughput: the `frames` stage against plain sequential OpenCV decoding.

    .venv/bin/python benchmarks/frame_extraction.py [--source DIR] [--frames 16] [--size 224]

Both sides decode the same clips and produce the same uint8 arrays (same frame indices, same
letterbox):
- reference: one process, `cv2.VideoCapture.read()` of every frame in order, the sampled ones
  letterboxed and kept as they pass (how a notebook does it);
- stage: `pipeline.frames.extract_frames`, exactly as `dvc repro` runs it (worker processes,
  grab-without-convert for skipped frames, results written through a memory map).
Each side runs in its own fresh process; peak RSS is reported for that process and for the
largest of its worker processes; the best of `--repeats` runs is reported. Default source: ../shared/data/real/cricket_shots (real 720p
H.264), else a generated sample. Target: stage >= 1.5x the reference on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "real" / "cricket_shots"


def prepare(source: Path | None, frames: int, size: int, root: Path) -> dict:
    """download + clean into `root` (DVC_ROOT) through the real config; returns the params."""
    from pipeline.clean import clean
    from pipeline.download import download
    from pipeline.params import compose_params

    os.environ["DVC_ROOT"] = str(root)
    overrides = [f"frames.num_frames={frames}", f"frames.size={size}"]
    if source is not None:
        classes = sorted(d.name for d in source.iterdir() if d.is_dir())
        overrides += ["dataset=folder", f"dataset.path={source}",
                      f"dataset.classes=[{','.join(classes)}]"]
    params = compose_params(overrides, conf_dir=ROOT / "conf")
    download(params)
    clean(params)
    return params


def reference_decode(params: dict) -> int:
    """Sequential read() of every frame, keeping the sampled ones; returns frames decoded."""
    import cv2
    import numpy as np
    import pandas as pd

    from pipeline.common import resolve
    from pipeline.frames import letterbox, sample_indices

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


def peak_rss_kb() -> int:
    """This process's peak resident memory. `/proc/self/status` VmHWM where available:
    Linux carries `ru_maxrss` over from the parent across fork+exec, so a child started by a
    big parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_variant(variant: str, root: Path) -> None:
    """Child process: time one side and print a JSON line."""
    import logging

    from pipeline.common import load_params

    logging.disable(logging.WARNING)
    os.environ["DVC_ROOT"] = str(root)
    params = load_params(root / "params.yaml")
    start = time.perf_counter()
    if variant == "reference":
        reference_decode(params)
    else:
        from pipeline.frames import extract_frames

        extract_frames(params)
    seconds = time.perf_counter() - start
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_kb() / 1024,
                      "worker_peak_mb": child_kb / 1024}))


def measure(variant: str, root: Path) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--root", str(root)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None,
                        help="folder-per-class videos (default: cricket_shots if present)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=["reference", "stage"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.root)
        return

    import logging

    import pandas as pd
    import yaml

    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    source = args.source or (DEFAULT_SOURCE if DEFAULT_SOURCE.is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as tmp:
        root = Path(tmp)
        params = prepare(source, args.frames, args.size, root)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        splits = pd.read_csv(root / params["paths"]["clean"] / "splits.csv")
        clips, source_frames = len(splits), int(splits["frames"].sum())
        from pipeline.common import worker_count

        workers = worker_count(params.get("workers"))
        reference_decode(params)  # warm the page cache so neither side pays the first read
        results = {v: min((measure(v, root) for _ in range(args.repeats)),
                          key=lambda r: r["seconds"]) for v in ("reference", "stage")}
    print(f"frame extraction: {clips} clips ({source_frames} source frames, "
          f"{splits['width'].max()}x{splits['height'].max()} max) from "
          f"{source or 'the generated sample'}; {args.frames} frames of {args.size}x{args.size} "
          f"per clip; {os.cpu_count()} CPUs, stage workers {workers}")
    print(f"{'':28}{'seconds':>9}{'clips/s':>9}{'src frames/s':>14}{'out frames/s':>14}"
          f"{'peak MB':>9}{'worker MB':>11}")
    for name, label in (("reference", "sequential OpenCV (ref.)"), ("stage", "frames stage")):
        r = results[name]
        print(f"{label:28}{r['seconds']:9.2f}{clips / r['seconds']:9.2f}"
              f"{source_frames / r['seconds']:14.1f}{clips * args.frames / r['seconds']:14.1f}"
              f"{r['peak_mb']:9.0f}{r['worker_peak_mb']:11.0f}")
    speedup = results["reference"]["seconds"] / results["stage"]["seconds"]
    print(f"speed-up: {speedup:.2f}x (target >= 1.5x)")


if __name__ == "__main__":
    main()
