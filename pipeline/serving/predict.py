"""Classify new videos with a trained model: clips, folders, or windows over long recordings.

    python -m pipeline.predict VIDEO_OR_FOLDER [...] [--model URI] [--top-k K] [--format table|json|csv]
    python -m pipeline.predict practice.mp4 --window 2 --stride 1 [--timeline-png strip.png]

`--model` takes any MLflow model URI (`models:/<name>@champion`, `runs:/<run>/model`,
`models:/m-<id>`, a local model folder). The default is the registered champion
(`compare.register_as` @ `compare.alias`), else the best model of the latest comparison run.
Each clip goes through the preprocessing the model was trained with (logged with the model).
Results go to stdout; progress, the model used and the summary go to the log (stderr).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import write_bytes_atomic
from pipeline.config import load_config
from pipeline.errors import PipelineError, server_refusals
from pipeline.logs import quiet_tensorflow_runtime, setup_logging
from pipeline.serving.champion import default_model
from pipeline.serving.clips import VideoError, video_paths
from pipeline.serving.pyfunc import load_video_classifier
from pipeline.tensorflow_start import prepare_tensorflow

log = logging.getLogger(__name__)


FORMATS = ("table", "json", "csv")


def use_project_store() -> str:
    """Point MLflow at the project's store (unless MLFLOW_TRACKING_URI says otherwise)."""
    import mlflow

    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(os.environ.get("MLFLOW_REGISTRY_URI") or uri)
    return uri


def top_k(classes: list[str], probs: np.ndarray, k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(classes[i], float(probs[i])) for i in order]


def ranked_columns(ranked: list[tuple[str, float]]) -> dict:
    out = {}
    for rank, (action, p) in enumerate(ranked, 1):
        out[f"action_{rank}"] = action
        out[f"probability_{rank}"] = round(p, 4)
    return out


def class_probabilities(classes: list[str], probs: np.ndarray) -> dict[str, float]:
    """Every class's probability (JSON output: a script can read any class's score)."""
    return {c: round(float(p), 4) for c, p in zip(classes, probs)}


def clip_rows(classifier, paths: list[Path], k: int) -> list[dict]:
    """One row per file: the top-k actions with probabilities, or the error that skipped it."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=len(paths), desc="predict", unit="clip")
    for path, probs, error in classifier.classify_clips(paths):
        row = {"path": str(path)}
        if probs is None:
            log.warning("skipped %s", error)
            row["error"] = error
        else:
            row.update(ranked_columns(top_k(classifier.classes, probs, k)))
            row["probabilities"] = class_probabilities(classifier.classes, probs)
        rows.append(row)
        bar.update()
    bar.close()
    return rows


def timeline_figure(timeline: pd.DataFrame, classes: list[str], title: str):
    """A strip: each window's stride-long slot coloured by its top action, shaded by its
    probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 1.9))
    starts = timeline["start_s"].to_numpy()
    ends = np.append(starts[1:], timeline["end_s"].iloc[-1])
    for start, end, action, p in zip(starts, ends, timeline["action_1"], timeline["probability_1"]):
        ax.broken_barh(
            [(start, max(end - start, 1e-3))],
            (0, 1),
            facecolors=colours(classes.index(action) % 10),
            alpha=0.25 + 0.75 * p,
        )
    ax.set_xlim(0, float(timeline["end_s"].max()))
    ax.set_yticks([])
    ax.set_xlabel("time (s); colour: top action, opacity: its probability")
    ax.set_title(title, fontsize=10)
    ax.legend(
        handles=[Patch(color=colours(i % 10), label=c) for i, c in enumerate(classes)],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.45),
        ncol=len(classes),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    return fig


def window_rows(
    classifier, path: Path, window_s: float, stride_s: float, k: int, png: Path
) -> list[dict]:
    """The timeline of one recording (one row per window) and its PNG strip."""
    table = classifier.classify_windows(path, window_s, stride_s)
    rows = [
        {
            "path": str(path),
            "start_s": r["start_s"],
            "end_s": r["end_s"],
            **ranked_columns(top_k(classifier.classes, probs, k)),
            "probabilities": class_probabilities(classifier.classes, probs),
        }
        for (_, r), probs in zip(table.iterrows(), table[classifier.classes].to_numpy(dtype=float))
    ]
    fig = timeline_figure(
        pd.DataFrame(rows),
        classifier.classes,
        f"{path.name}: {window_s:g} s windows every {stride_s:g} s",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    write_bytes_atomic(png, buffer.getvalue())
    log.info("%s: %d windows; timeline strip in %s", path, len(rows), png)
    return rows


def render(rows: list[dict], fmt: str) -> str:
    """JSON: each row with the top-k and a `probabilities` object of every class; table and
    CSV: the top-k columns."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "probabilities"} for r in rows])
    if fmt == "csv":
        return table.to_csv(index=False)
    return table.astype(object).where(table.notna(), "").to_string(index=False)


def predict(
    targets: list[Path],
    model_uri: str | None = None,
    k: int = 3,
    window_s: float | None = None,
    stride_s: float | None = None,
    timeline_png: Path | None = None,
    params_path: Path | None = None,
    hflip: bool = False,
    views: bool = False,
) -> list[dict]:
    """Classify every video under `targets`; returns one row per file (or per window); with
    `hflip`, each clip's probabilities averaged with its mirror image's; with `views`, over
    interleaved views of its sampled frames."""
    store = use_project_store()
    if model_uri:
        description = model_uri
    else:
        try:
            config = load_config(params_path)
        except FileNotFoundError as exc:
            raise PipelineError(
                f"no --model given, and the champion's name comes from the "
                f"project's params.yaml: {exc}. Run from the project folder "
                f"or pass --model URI"
            ) from exc
        model_uri, description = default_model(config, store)
    log.info("model: %s (%s)", model_uri, description)
    classifier, _ = load_video_classifier(model_uri)
    if hflip and not classifier.use_mirror_averaging():
        log.warning("--hflip: %s reads features, not frames; ignored", classifier.pre["model"])
    if views and not classifier.use_view_averaging():
        log.warning(
            "--views: %s reads every sampled frame (frames.num_frames %s), one view; ignored",
            classifier.pre["model"],
            classifier.pre["frames"]["num_frames"],
        )
    log.info(
        "model: %s trained on %d classes, %d frames of %dx%d (%s sampling)%s",
        classifier.pre["model"],
        len(classifier.classes),
        classifier.pre["frames"]["num_frames"],
        classifier.pre["frames"]["size"],
        classifier.pre["frames"]["size"],
        classifier.pre["frames"]["sampling"],
        f", {classifier.pre['features']['backbone']} features"
        if "features" in classifier.pre
        else "",
    )
    paths = [p for target in targets for p in video_paths(target)]
    if not paths:
        raise PipelineError(f"no video files under {', '.join(map(str, targets))}")
    k = max(1, min(int(k), len(classifier.classes)))
    if window_s is None:
        rows = clip_rows(classifier, paths, k)
    else:
        rows = []
        for path in paths:
            png = (
                timeline_png
                if timeline_png and len(paths) == 1
                else (
                    (timeline_png.parent if timeline_png else Path.cwd())
                    / f"{path.stem}.timeline.png"
                )
            )
            try:
                rows += window_rows(classifier, path, window_s, stride_s or window_s, k, png)
            except VideoError as exc:
                log.warning("skipped %s", exc)
                rows.append({"path": str(path), "error": str(exc)})
    skipped = [r for r in rows if r.get("error")]
    done = len({r["path"] for r in rows}) - len(skipped)
    log.info(
        "predict: %d of %d files classified with %s (%s)%s",
        done,
        len(paths),
        classifier.pre["model"],
        model_uri,
        f"; {len(skipped)} skipped: " + "; ".join(r["error"] for r in skipped) if skipped else "",
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", type=Path, metavar="VIDEO_OR_FOLDER")
    parser.add_argument(
        "--model", help="MLflow model URI or local model folder (default: the registered champion)"
    )
    parser.add_argument("--top-k", type=int, default=3, help="actions listed per clip")
    parser.add_argument("--format", choices=FORMATS, default="table")
    parser.add_argument(
        "--window",
        type=float,
        metavar="SECONDS",
        help="classify sliding windows of this length (long recordings)",
    )
    parser.add_argument(
        "--stride",
        type=float,
        metavar="SECONDS",
        help="seconds between window starts (default: --window)",
    )
    parser.add_argument(
        "--timeline-png",
        type=Path,
        metavar="FILE",
        help="where the timeline strip goes (default ./<video>.timeline.png)",
    )
    parser.add_argument(
        "--hflip",
        action="store_true",
        help="test-time averaging: classify each clip also mirrored left-right and average "
        "(models on frames; a model evaluated so does it anyway)",
    )
    parser.add_argument(
        "--views",
        action="store_true",
        help="test-time averaging over time: classify each clip's interleaved subsets of its "
        "sampled frames and average (models that read fewer frames than are sampled)",
    )
    parser.add_argument(
        "--params", type=Path, help="params.yaml naming the champion (default: the project's)"
    )
    args = parser.parse_args(argv)
    if args.stride is not None and args.window is None:
        parser.error("--stride needs --window")
    setup_logging()
    prepare_tensorflow()
    try:
        with server_refusals(), quiet_tensorflow_runtime():
            rows = predict(
                args.targets,
                args.model,
                args.top_k,
                args.window,
                args.stride,
                args.timeline_png,
                args.params,
                args.hflip,
                args.views,
            )
    except (PipelineError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    sys.stdout.write(render(rows, args.format) + "\n")
    if rows and all(r.get("error") for r in rows):
        sys.exit(1)  # nothing could be classified


if __name__ == "__main__":
    main()
