"""A trained classifier with its own preprocessing: what a logged model carries and serves.

A new video goes through exactly what the pipeline did to the clips the model was evaluated
on: every frame counted by decoding it (clean), `frames.num_frames` frames sampled over the
clip and letterboxed (frames), ResNet101V2 features for `cnn_gru` (features: same backbone,
weights, last layer, batch size), then the model's own frame subset (train). The settings come
from `preprocessing.json`, written from the run's config when the model is logged, never from
the config of whoever loads it. The MLflow wrapper is `pipeline.serving.pyfunc`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.serving.clips import (
    TooFewFrames,
    VideoError,
    clip_frames,
    count_frames,
    too_few_frames,
    window_bounds,
    window_frames,
)

if TYPE_CHECKING:
    from pipeline.schema import ModelSection
    from pipeline.schema.sections import Features, Frames

log = logging.getLogger(__name__)


# what a served model imports (pipeline/ itself travels with the model as code)
SERVING_DISTRIBUTIONS = (
    "mlflow",
    "tensorflow",
    "keras",
    "numpy",
    "pandas",
    "scikit-learn",
    "opencv-python-headless",
    "pyyaml",
    "tqdm",
    "openvino",  # features.runtime=openvino (cnn_gru's backbone)
)


def preprocessing_config(
    model: ModelSection, classes: list[str], frames: Frames, min_frames: int
) -> dict:
    """What a new clip must go through to reach `model` as its test clips did (a model on
    features also needs `feature_preprocessing` under "features")."""
    return {
        "model": model.name,
        "classes": list(classes),
        "input": model.input,
        "frames": frames.model_dump(include={"num_frames", "size", "pad_value", "sampling"}),
        "model_frames": model.num_frames,
        # the optical flow the model reads next to the frames (frames.flow), or None
        "flow": frames.flow.model_dump() if model.reads_flow else None,
        "flow_grid": getattr(model, "flow_grid", 0),  # cnn_gru: flow pooled per frame
        # test-time averaging: each clip's probabilities with its mirror image's (frame models)
        "tta_hflip": getattr(model, "tta_hflip", False),
        # ... and over interleaved views of the sampled frames (tta_views)
        "tta_views": model.tta_views,
        "batch_size": model.train.batch_size,
        # the fewest decodable frames of a clip the model saw (shorter clips were quarantined)
        "min_frames": min_frames,
    }


def feature_preprocessing(features: Features, seed: int, features_dir: Path) -> dict:
    """How a model on features gets them: the features stage's settings (weights null: a
    random init from `seed`) and the runtime and precision of the test features, the record
    in `features_dir` after any fallback, else the config."""
    used = features_dir / "runtime.json"
    kept = ("backbone", "weights", "output_layer", "batch_size", "motion", "runtime", "precision")
    return {
        **features.model_dump(include=set(kept)),
        "seed": seed,
        **(json.loads(used.read_text()) if used.is_file() else {}),
    }


class ClipClassifier:
    """What classifies videos given `probabilities` of decoded clips: single files, folders,
    windows over a long recording. `pre` says how a clip is decoded and sampled (frames,
    min_frames), `classes` the order of the probabilities."""

    pre: dict
    classes: list[str]

    def prepare(self) -> None:
        """Build what computes the probabilities now, not in the first request."""

    def probabilities(self, frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(B x classes) class probabilities for a batch of sampled clips."""
        raise NotImplementedError

    def use_mirror_averaging(self) -> bool:
        """Average each clip with its mirror image from now on, where the model can."""
        return False

    def use_view_averaging(self) -> bool:
        """Average each clip over interleaved views of its frames from now on, where the
        model reads fewer frames than are sampled."""
        return False

    def classify_clips(
        self, paths: list[Path], chunk: int = 8
    ) -> Iterator[tuple[Path, np.ndarray | None, str]]:
        """(path, probabilities or None, error) per file; a bad file is reported, not fatal."""
        for start in range(0, len(paths), chunk):
            batch, failed = [], []
            for path in paths[start : start + chunk]:
                try:
                    batch.append((path, *clip_frames(path, self.pre)))
                except VideoError as exc:
                    failed.append((path, str(exc)))
            probs = (
                self.probabilities(
                    np.stack([f for _, f, _ in batch]), np.stack([m for _, _, m in batch])
                )
                if batch
                else []
            )
            results = {p: (pr, "") for (p, _, _), pr in zip(batch, probs)}
            results.update({p: (None, e) for p, e in failed})
            for path in paths[start : start + chunk]:
                yield (path, *results[path])

    def classify_windows(
        self, path: Path, window_s: float, stride_s: float, chunk: int = 16
    ) -> pd.DataFrame:
        """One row per window: start_s, end_s and the class probabilities."""
        total, fps = count_frames(path)
        if reason := too_few_frames(total, self.pre):
            raise TooFewFrames(path, reason)
        bounds = window_bounds(total, fps, window_s, stride_s)
        shortest = min(end - start for start, end in bounds)
        if reason := too_few_frames(shortest, self.pre, f"frames in a {window_s:g} s window"):
            raise TooFewFrames(path, f"{reason}; give a longer --window")
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
        table = pd.DataFrame(
            np.asarray(probs, dtype=float).reshape(-1, len(self.classes)), columns=self.classes
        )
        top = table.to_numpy().argmax(axis=1)
        table.insert(0, "top_action", [self.classes[i] for i in top])
        table.insert(1, "top_probability", table[self.classes].to_numpy().max(axis=1))
        return table


class VideoClassifier(ClipClassifier):
    """The classifier and its preprocessing; `VideoClassifierModel` wraps it for MLflow.

    Safe to call from several threads at once (`mlflow models serve` runs each request in a
    thread of its own): the runners are built once under a lock, OpenVINO keeps a pool of
    infer requests, and Keras' `predict_on_batch` runs concurrently as it is.
    """

    def __init__(self, keras_model, pre: dict, backbone_weights: str | None = None):
        self.model = keras_model
        self.pre = pre
        self.classes = list(pre["classes"])
        self.backbone_weights = backbone_weights
        self._backbone = None
        self.backbone_runtime: tuple[str, str] | None = None
        self._runner = None
        self.runtime: str | None = None  # what runs the classifier, once `runner()` decided
        self._building = threading.Lock()

    def prepare(self) -> None:
        """Build what computes the probabilities now (OpenVINO conversion, cnn_gru's backbone),
        not in the first request: a server that answers /ping is ready to classify."""
        self.runner()
        if self.pre["input"] == "features":
            self.backbone()

    def runner(self):
        """What computes the probabilities: a model on frames (frame_cnn, cnn3d) runs on
        OpenVINO in float32 where this machine can (the probabilities it was evaluated with,
        to ~1e-6; frame_cnn's forward pass 4x faster here), converted once and cached;
        HANDBALL_INFERENCE_RUNTIME=keras keeps Keras. cnn_gru's small GRU stays on Keras (its
        backbone follows the recorded `features.runtime`)."""
        with self._building:
            if self._runner is None:
                self._runner, self.runtime = self._build_runner()
        return self._runner

    def _build_runner(self):
        from pipeline.models.runtimes import (
            INFERENCE_RUNTIME_VARIABLE,
            OpenVinoModel,
            usable_runtime,
        )

        wanted = os.environ.get(INFERENCE_RUNTIME_VARIABLE) or "openvino"
        if self.pre["input"] == "frames":
            runtime, _ = usable_runtime(wanted, "float32", INFERENCE_RUNTIME_VARIABLE, "precision")
            if runtime == "openvino":
                return OpenVinoModel(self.model, "float32"), runtime
        return self.model, "keras"

    def backbone(self):
        """The feature backbone of `cnn_gru`, built as the features stage built it: seeded
        right before construction, so `weights: null` gives the same random weights."""
        with self._building:  # one build: the seed is process-wide
            if self._backbone is None:
                from pipeline.models.backbones import build_feature_backbone
                from pipeline.models.seeding import seed_everything

                feats, size = self.pre["features"], int(self.pre["frames"]["size"])
                seed_everything(int(feats["seed"]))
                # the runtime and precision the model was evaluated with, where this machine can
                backbone, preprocess, used = build_feature_backbone(
                    feats, size, self.backbone_weights
                )
                self._backbone = (backbone, preprocess)
                self.backbone_runtime = used  # (runtime, precision) after any fallback
        return self._backbone

    def model_inputs(self, frames: np.ndarray, masks: np.ndarray) -> list:
        """Model inputs for a batch of sampled clips (B x N x S x S x 3 uint8, or x 5 with
        their optical flow after the RGB channels; B x N): one per view the model averages
        over (`tta_views`; else the model's fixed frames alone), as its test clips had."""
        from pipeline.data.arrays import evaluation_views
        from pipeline.data.flow import RGB_CHANNELS, pooled_flow

        if self.pre.get("flow") and frames.shape[-1] == RGB_CHANNELS:
            raise ValueError(f"{self.pre['model']} reads optical flow: decode clips with it")
        sampling = (self.pre.get("model_frames"), bool(self.pre.get("tta_views")))
        rgb = frames[..., :RGB_CHANNELS]
        if self.pre["input"] == "frames":
            return evaluation_views(frames if self.pre.get("flow") else rgb, *sampling)
        from pipeline.models.backbones import frame_features

        backbone, preprocess = self.backbone()
        # The features stage's batch size, but no larger than the frames at hand: one clip's
        # 8 frames padded to a batch of 32 took 4.8x as long, for features that agree with
        # the cached ones to 3e-7 (relative) either way.
        batch = min(int(self.pre["features"]["batch_size"]), frames.shape[0] * frames.shape[1])
        feats = frame_features(
            backbone,
            preprocess,
            rgb,
            batch,
            desc="",
            motion=bool(self.pre["features"].get("motion")),
        )
        if grid := self.pre.get("flow_grid"):  # as `load_split` appends it to cached features
            motion = pooled_flow(frames[..., RGB_CHANNELS:], grid)
            feats = np.concatenate([feats, motion.astype(feats.dtype)], axis=-1)
        return evaluation_views({"features": feats, "mask": masks}, *sampling)

    def use_mirror_averaging(self) -> bool:
        """Average each clip's probabilities with its mirror image's from now on (`predict
        --hflip`); False for a model on features (its backbone sees the frames as they are)."""
        if self.pre["input"] != "frames":
            return False
        self.pre["tta_hflip"] = True
        return True

    def use_view_averaging(self) -> bool:
        """Average each clip's probabilities over interleaved views of its sampled frames from
        now on (`predict --views`); False when the model reads every sampled frame (one view)."""
        from pipeline.data.temporal import view_count

        if view_count(int(self.pre["frames"]["num_frames"]), self.pre.get("model_frames")) < 2:
            return False
        self.pre["tta_views"] = True
        return True

    def probabilities(self, frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(B x classes) class probabilities for a batch of sampled clips, in the training
        batch size (`predict_on_batch`: Keras' `predict` adds ~0.1 s per call here); averaged
        over views in time (`tta_views`) and over each clip and its mirror image
        (`tta_hflip`) where the model was evaluated so."""
        from pipeline.data.arrays import mirror_average, mirrored

        probs = [
            mirror_average(self.predict_in_batches(mirrored(inputs)))
            if self.pre.get("tta_hflip")
            else self.predict_in_batches(inputs)
            for inputs in self.model_inputs(frames, masks)
        ]
        return np.mean(probs, axis=0)

    def predict_in_batches(self, inputs) -> np.ndarray:
        step = int(self.pre["batch_size"])
        parts = []
        total = len(inputs["features"]) if isinstance(inputs, dict) else len(inputs)
        for start in range(0, total, step):
            part = (
                {k: v[start : start + step] for k, v in inputs.items()}
                if isinstance(inputs, dict)
                else inputs[start : start + step]
            )
            parts.append(np.asarray(self.runner().predict_on_batch(part)))
        return np.concatenate(parts)
