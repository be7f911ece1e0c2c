"""A trained classifier as an MLflow pyfunc model that carries its own preprocessing.

A new video goes through exactly what the pipeline did to the clips the model was evaluated
on: every frame counted by decoding it (clean), `frames.num_frames` frames sampled over the
clip and letterboxed (frames), ResNet101V2 features for `cnn_gru` (features, same backbone,
weights and batch size), then the model's own frame subset (train). The settings come from
`preprocessing.json`, written from the run's config when the model is logged, never from the
config of whoever loads it.

Input rows (a pandas DataFrame, or JSON over `mlflow models serve`) carry either `video`
(the file's bytes, base64) or `path` (a file the predicting process can read). Output rows
hold `top_action`, `top_probability` and one probability column per class.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.common import PipelineError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".mpg", ".mpeg", ".m4v", ".webm", ".wmv")
MAX_VIDEO_MB_ENV = "HANDBALL_MAX_VIDEO_MB"  # request size cap of a served model
DEFAULT_MAX_VIDEO_MB = 200.0
# registry tag `format` of models logged by log_video_classifier; bump when the interface changes
MODEL_FORMAT = "video-pyfunc/1"
# what a served model imports (pipeline/ itself travels with the model as code)
SERVING_DISTRIBUTIONS = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "scikit-learn",
                         "opencv-python-headless", "pyyaml", "tqdm")


class VideoError(PipelineError):
    """One input video cannot be classified (unreadable, empty, too large...)."""


def preprocessing_config(params: dict, name: str, classes: list[str]) -> dict:
    """What a new clip must go through to reach model `name` as its test clips did."""
    cfg = params["models"][name]
    pre = {
        "model": name,
        "classes": list(classes),
        "input": cfg["input"],
        "frames": {k: params["frames"][k] for k in ("num_frames", "size", "pad_value",
                                                     "sampling")},
        "model_frames": cfg.get("num_frames"),
        "batch_size": int(cfg["train"]["batch_size"]),
    }
    if cfg["input"] == "features":
        feats = params["features"]
        pre["features"] = {"backbone": feats["backbone"], "weights": feats["weights"],
                           "batch_size": int(feats["batch_size"]), "seed": int(params["seed"]),
                           "motion": bool(feats.get("motion"))}
    return pre


def count_frames(path: Path) -> tuple[int, float]:
    """(decodable frames, fps) of a video, counted by decoding as the clean stage does."""
    from pipeline.clean import probe_clip

    info = probe_clip(path)
    if info["error"]:
        raise VideoError(f"{path}: {info['error']}")
    return info["frames"], info["fps"]


def clip_frames(path: Path, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """(N x S x S x 3 uint8, N mask) of one clip: the frames the frames stage would cache.

    The clean stage counts a clip's frames by decoding all of them and the frames stage then
    samples on that count. Here this takes one pass when the container's frame count is right
    (the usual case): the frames at the positions sampled for that count are kept while every
    frame is counted. If the count turns out to differ, the positions are redrawn on the true
    count and the clip decoded again, so the result is always the stage's.
    """
    import cv2

    from pipeline.frames import read_indices, repeat_mask, sample_frames, sample_indices
    from pipeline.video import open_video

    cfg = pre["frames"]
    n, size, pad, sampling = (int(cfg["num_frames"]), int(cfg["size"]), int(cfg["pad_value"]),
                              cfg["sampling"])
    if not path.is_file() or path.stat().st_size == 0:
        raise VideoError(f"{path}: empty or missing file")
    cap = open_video(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it (not a video, or an unsupported codec)")
    hint = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    wanted = sample_indices(hint, n, sampling) if hint > 0 else np.array([], dtype=int)
    try:
        kept, total = read_indices(cap, wanted, size, pad, count_all=True)
    finally:
        cap.release()
    if total == 0:
        raise VideoError(f"{path}: no decodable frames")
    indices = sample_indices(total, n, sampling)
    if set(indices.tolist()) <= kept.keys():
        return np.stack([kept[i] for i in indices]), repeat_mask(indices)
    try:  # the container's count was off
        return sample_frames(path, total, n, size, pad, sampling)
    except IOError as exc:
        raise VideoError(str(exc)) from exc


def window_bounds(total: int, fps: float, window_s: float, stride_s: float
                  ) -> list[tuple[int, int]]:
    """[start, end) frame ranges of `window_s`-second windows every `stride_s` seconds.

    The last window is aligned to the end of the video, so every frame is covered; a video
    shorter than one window is one window.
    """
    if window_s <= 0 or stride_s <= 0:
        raise ValueError(f"--window ({window_s}) and --stride ({stride_s}) must be positive")
    if fps <= 0:
        raise VideoError("the video reports no frame rate; windows in seconds need one")
    length = max(1, round(window_s * fps))
    stride = max(1, round(stride_s * fps))
    if total <= length:
        return [(0, total)]
    bounds = [(s, s + length) for s in range(0, total - length + 1, stride)]
    if bounds[-1][1] < total:
        bounds.append((total - length, total))
    return bounds


def window_frames(path: Path, pre: dict, bounds: list[tuple[int, int]]
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each window's sampled frames and mask, decoding the video once front to back.

    Frames are kept only until the last window that needs them has been yielded, so memory
    holds the frames of the windows that overlap, not the whole recording.
    """
    from pipeline.frames import display_frame, repeat_mask, sample_indices
    from pipeline.video import open_video

    cfg = pre["frames"]
    n, size, pad = int(cfg["num_frames"]), int(cfg["size"]), int(cfg["pad_value"])
    plans = [start + sample_indices(end - start, n, cfg["sampling"]) for start, end in bounds]
    last_use: dict[int, int] = {}
    for w, idx in enumerate(plans):
        for i in idx.tolist():
            last_use[i] = w
    kept: dict[int, np.ndarray] = {}
    cap = open_video(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it")
    try:
        frame_no, next_window = 0, 0
        while next_window < len(plans) and cap.grab():
            if frame_no in last_use:
                ok, frame = cap.retrieve()
                if not ok:
                    raise VideoError(f"{path}: frame {frame_no} does not decode")
                kept[frame_no] = display_frame(frame, size, pad)
            while next_window < len(plans) and int(plans[next_window].max()) <= frame_no:
                idx = plans[next_window]
                yield np.stack([kept[i] for i in idx.tolist()]), repeat_mask(idx)
                for i in set(idx.tolist()):
                    if last_use[i] == next_window:
                        del kept[i]
                next_window += 1
            frame_no += 1
    finally:
        cap.release()
    if next_window < len(plans):
        raise VideoError(f"{path}: stopped decoding at frame {frame_no}, before the end counted")


def video_paths(target: Path) -> list[Path]:
    """The video files of a file or folder (recursively, sorted)."""
    if target.is_dir():
        return sorted(p for p in target.rglob("*")
                      if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if target.exists():
        return [target]
    raise FileNotFoundError(f"{target}: no such file or folder")


class VideoClassifier:
    """The classifier and its preprocessing; `VideoClassifierModel` wraps it for MLflow."""

    def __init__(self, keras_model, pre: dict, backbone_weights: str | None = None):
        self.model = keras_model
        self.pre = pre
        self.classes = list(pre["classes"])
        self._backbone_weights = backbone_weights
        self._backbone = None

    def backbone(self):
        """The feature backbone of `cnn_gru`, built as the features stage built it: seeded
        right before construction, so `weights: null` gives the same random weights."""
        if self._backbone is None:
            from pipeline.backbones import build_backbone, preprocess_for
            from pipeline.common import seed_everything

            feats, size = self.pre["features"], int(self.pre["frames"]["size"])
            weights = self._backbone_weights or feats["weights"]
            seed_everything(int(feats["seed"]))
            self._backbone = (build_backbone(feats["backbone"], weights, (size, size, 3),
                                             config_key="features.weights", pooling="avg"),
                              preprocess_for(feats["backbone"]))
        return self._backbone

    def model_inputs(self, frames: np.ndarray, masks: np.ndarray):
        """Model inputs for a batch of sampled clips (B x N x S x S x 3 uint8, B x N)."""
        from pipeline.train import frame_subset, sequence_inputs

        if self.pre["input"] == "frames":
            return frames[:, frame_subset(frames.shape[1], self.pre.get("model_frames"))]
        from pipeline.features import frame_features

        backbone, preprocess = self.backbone()
        # The features stage's batch size, but no larger than the frames at hand: one clip's
        # 8 frames padded to a batch of 32 took 4.8x as long, for features that agree with
        # the cached ones to 3e-7 (relative) either way.
        batch = min(int(self.pre["features"]["batch_size"]), frames.shape[0] * frames.shape[1])
        feats = frame_features(backbone, preprocess, frames, batch, desc="",
                               motion=bool(self.pre["features"].get("motion")))
        return sequence_inputs(feats, masks, self.pre.get("model_frames"))

    def probabilities(self, frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(B x classes) class probabilities for a batch of sampled clips, in the training
        batch size (`predict_on_batch`: Keras' `predict` adds ~0.1 s per call here)."""
        inputs = self.model_inputs(frames, masks)
        step = int(self.pre["batch_size"])
        parts = []
        for start in range(0, len(frames), step):
            part = ({k: v[start:start + step] for k, v in inputs.items()}
                    if isinstance(inputs, dict) else inputs[start:start + step])
            parts.append(np.asarray(self.model.predict_on_batch(part)))
        return np.concatenate(parts)

    def classify_clips(self, paths: list[Path], chunk: int = 8
                       ) -> Iterator[tuple[Path, np.ndarray | None, str]]:
        """(path, probabilities or None, error) per file; a bad file is reported, not fatal."""
        for start in range(0, len(paths), chunk):
            batch, failed = [], []
            for path in paths[start:start + chunk]:
                try:
                    batch.append((path, *clip_frames(path, self.pre)))
                except VideoError as exc:
                    failed.append((path, str(exc)))
            probs = (self.probabilities(np.stack([f for _, f, _ in batch]),
                                        np.stack([m for _, _, m in batch]))
                     if batch else [])
            results = {p: (pr, "") for (p, _, _), pr in zip(batch, probs)}
            results.update({p: (None, e) for p, e in failed})
            for path in paths[start:start + chunk]:
                yield (path, *results[path])

    def classify_windows(self, path: Path, window_s: float, stride_s: float,
                         chunk: int = 16) -> pd.DataFrame:
        """One row per window: start_s, end_s and the class probabilities."""
        total, fps = count_frames(path)
        bounds = window_bounds(total, fps, window_s, stride_s)
        rows, frames, masks = [], [], []

        def flush():
            if frames:
                rows.extend(self.probabilities(np.stack(frames), np.stack(masks)))
                frames.clear()
                masks.clear()

        for clip, mask in window_frames(path, self.pre, bounds):
            frames.append(clip)
            masks.append(mask)
            if len(frames) == chunk:
                flush()
        flush()
        table = pd.DataFrame(np.asarray(rows), columns=self.classes)
        table.insert(0, "start_s", [round(s / fps, 3) for s, _ in bounds])
        table.insert(1, "end_s", [round(e / fps, 3) for _, e in bounds])
        return table

    def probability_table(self, probs: np.ndarray) -> pd.DataFrame:
        table = pd.DataFrame(np.asarray(probs, dtype=float).reshape(-1, len(self.classes)),
                             columns=self.classes)
        top = table.to_numpy().argmax(axis=1)
        table.insert(0, "top_action", [self.classes[i] for i in top])
        table.insert(1, "top_probability", table[self.classes].to_numpy().max(axis=1))
        return table


def max_video_mb() -> float:
    return float(os.environ.get(MAX_VIDEO_MB_ENV, DEFAULT_MAX_VIDEO_MB))


def request_videos(frame: pd.DataFrame) -> Iterator[tuple[int, Path, bool]]:
    """(row, file, is_temporary) for each input row: `video` (base64) is written to a temporary
    file, `path` is used as it is. Anything else is refused with the reason."""
    has_video, has_path = "video" in frame, "path" in frame
    if not (has_video or has_path) or frame.empty:
        raise VideoError("each input row needs a `video` field (the video file's bytes, "
                         "base64-encoded) or a `path` field (a file the server can read); got "
                         f"fields {sorted(map(str, frame.columns))} and {len(frame)} rows")
    limit_mb = max_video_mb()
    limit = limit_mb * 2**20
    for row in range(len(frame)):
        data = frame["video"].iloc[row] if has_video else None
        path = frame["path"].iloc[row] if has_path else None
        if isinstance(data, str) and data:
            if len(data) * 3 // 4 > limit:
                raise VideoError(f"row {row}: the video is over the {limit_mb:g} MB limit "
                                 f"({MAX_VIDEO_MB_ENV})")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise VideoError(f"row {row}: `video` is not valid base64 ({exc})") from exc
            if not raw:
                raise VideoError(f"row {row}: `video` is empty")
            fd, name = tempfile.mkstemp(suffix=".video")
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw)
            yield row, Path(name), True
        elif isinstance(path, str) and path:
            file = Path(path)
            if not file.is_file():
                raise VideoError(f"row {row}: `path` {path} is not a readable file")
            if file.stat().st_size > limit:
                raise VideoError(f"row {row}: {path} is over the {limit_mb:g} MB limit "
                                 f"({MAX_VIDEO_MB_ENV})")
            yield row, file, False
        else:
            raise VideoError(f"row {row}: `video` and `path` are both missing or empty")


class VideoClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: input rows `video` (base64) or `path`, output class probabilities.

    Artifacts: `keras_model` (the trained .keras file), `preprocessing` (json) and, when the
    features backbone used a local weights file, `backbone_weights`.
    """

    def load_context(self, context):
        import keras

        pre = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self.classifier = VideoClassifier(
            keras.models.load_model(context.artifacts["keras_model"]), pre,
            context.artifacts.get("backbone_weights"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        files: list[tuple[int, Path, bool]] = []
        try:
            for item in request_videos(model_input):
                files.append(item)
            frames, masks = [], []
            for row, path, _ in files:
                try:
                    clip, mask = clip_frames(path, self.classifier.pre)
                except VideoError as exc:
                    raise VideoError(f"row {row}: not a readable video "
                                     f"({str(exc).split(': ', 1)[-1]})") from exc
                frames.append(clip)
                masks.append(mask)
        except VideoError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        finally:
            for _, path, temporary in files:
                if temporary:
                    path.unlink(missing_ok=True)
        return self.classifier.probability_table(
            self.classifier.probabilities(np.stack(frames), np.stack(masks)))


def model_signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "video", required=False),
                     ColSpec("string", "path", required=False)])
    outputs = Schema([ColSpec("string", "top_action"), ColSpec("double", "top_probability")]
                     + [ColSpec("double", c) for c in classes])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_video_classifier(model_file: Path, pre: dict):
    """Log the trained model as the run's `model`: a VideoClassifierModel pyfunc carrying the
    .keras file, its preprocessing and the pipeline code. Returns MLflow's ModelInfo."""
    from importlib.metadata import version

    import mlflow

    from pipeline.common import resolve

    with tempfile.TemporaryDirectory() as tmp:
        pre_file = Path(tmp) / "preprocessing.json"
        pre_file.write_text(json.dumps(pre, indent=2))
        artifacts = {"keras_model": str(model_file), "preprocessing": str(pre_file)}
        weights = pre.get("features", {}).get("weights")
        if weights not in (None, "imagenet"):
            artifacts["backbone_weights"] = str(resolve(weights))
        requirements = [f"{dist}=={version(dist)}" for dist in SERVING_DISTRIBUTIONS]
        return mlflow.pyfunc.log_model(
            name="model", python_model=VideoClassifierModel(), artifacts=artifacts,
            code_paths=[str(Path(__file__).resolve().parent)],
            signature=model_signature(pre["classes"]), pip_requirements=requirements)


def load_video_classifier(uri: str) -> tuple[VideoClassifier, object]:
    """(VideoClassifier, PyFuncModel) of an MLflow model URI or local model folder."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(uri)
    try:
        classifier = getattr(model.unwrap_python_model(), "classifier", None)
    except MlflowException:  # another flavour, e.g. a bare Keras model
        classifier = None
    if classifier is None:
        raise PipelineError(f"{uri} is not a video classifier logged by this pipeline (no "
                            f"preprocessing with it); retrain it, e.g. `dvc repro -f train@<model>`")
    return classifier, model
