"""The MLflow pyfunc wrapper of a VideoClassifier, and logging and loading it.

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
from collections.abc import Iterator
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.serving.classifier import SERVING_DISTRIBUTIONS, VideoClassifier
from pipeline.serving.clips import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_ROWS,
    DEFAULT_MAX_VIDEO_MB,
    MAX_FRAMES_ENV,
    MAX_ROWS_ENV,
    MAX_VIDEO_MB_ENV,
    PATH_ROOT_ENV,
    FrameBudget,
    OverFrameBudget,
    TooFewFrames,
    VideoError,
    clip_frames,
)
from pipeline.tensorflow_start import prepare_tensorflow

log = logging.getLogger(__name__)


def env_number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def path_root() -> Path | None:
    """The folder requests may name files in (PATH_ROOT_ENV), or None: `path` is refused."""
    root = os.environ.get(PATH_ROOT_ENV, "").strip()
    return Path(root).resolve() if root else None


def allowed_file(path: str, row: int) -> Path:
    """The file a request row names by `path`, if reading paths is on and it lies under the
    allowed root. A missing file and one outside the root get the same answer, so requests
    cannot probe which files exist."""
    root = path_root()
    if root is None:
        raise VideoError(
            f"row {row}: this server does not read files by `path`; send the video's bytes as "
            f"`video` (base64), or start it with {PATH_ROOT_ENV}=<folder> to allow files there"
        )
    file = Path(path).resolve()  # symlinks and `..` resolved before the check
    if not (file.is_relative_to(root) and file.is_file()):
        raise VideoError(f"row {row}: `path` is not a readable file under {PATH_ROOT_ENV}")
    return file


def request_videos(frame: pd.DataFrame) -> Iterator[tuple[int, Path, bool]]:
    """(row, file, is_temporary) for each input row: `video` (base64) is written to a temporary
    file; `path` is read only under PATH_ROOT_ENV. Anything else is refused with the reason."""
    has_video, has_path = "video" in frame, "path" in frame
    if not (has_video or has_path) or frame.empty:
        raise VideoError(
            "each input row needs a `video` field (the video file's bytes, "
            "base64-encoded) or a `path` field (a file the server may read); got "
            f"fields {sorted(map(str, frame.columns))} and {len(frame)} rows"
        )
    max_rows = int(env_number(MAX_ROWS_ENV, DEFAULT_MAX_ROWS))
    if len(frame) > max_rows:
        raise VideoError(f"{len(frame)} rows: a request holds at most {max_rows} ({MAX_ROWS_ENV})")
    limit_mb = env_number(MAX_VIDEO_MB_ENV, DEFAULT_MAX_VIDEO_MB)
    limit = limit_mb * 2**20
    for row in range(len(frame)):
        data = frame["video"].iloc[row] if has_video else None
        path = frame["path"].iloc[row] if has_path else None
        if isinstance(data, str) and data:
            if len(data) * 3 // 4 > limit:
                raise VideoError(
                    f"row {row}: the video is over the {limit_mb:g} MB limit ({MAX_VIDEO_MB_ENV})"
                )
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
            file = allowed_file(path, row)
            if file.stat().st_size > limit:
                raise VideoError(
                    f"row {row}: the file is over the {limit_mb:g} MB limit ({MAX_VIDEO_MB_ENV})"
                )
            yield row, file, False
        else:
            raise VideoError(f"row {row}: `video` and `path` are both missing or empty")


class VideoClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: input rows `video` (base64) or `path` (only under PATH_ROOT_ENV), output
    class probabilities. Rows, video size and decoded frames per request are capped.

    Artifacts: `keras_model` (the trained .keras file), `preprocessing` (json) and, when the
    features backbone used a local weights file, `backbone_weights`.
    """

    def load_context(self, context):
        prepare_tensorflow()  # a served model's process starts here
        import keras

        pre = json.loads(Path(context.artifacts["preprocessing"]).read_text())
        self.classifier = VideoClassifier(
            keras.models.load_model(context.artifacts["keras_model"], compile=False),
            pre,
            context.artifacts.get("backbone_weights"),
        )
        self.classifier.prepare()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Probabilities per row. A request the model cannot classify is refused with
        INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`) naming the row and the
        problem; any other failure is the server's: its traceback goes to the log and the
        answer is INTERNAL_ERROR (HTTP 500), which clients may retry. MLflow's scoring server
        turns any other exception into a 400 "unexpected error", hence the translation."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        try:
            frames, masks = self.request_clips(model_input)
            return self.classifier.probability_table(self.classifier.probabilities(frames, masks))
        except VideoError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
        except Exception as exc:
            log.exception("classifying a request failed (a fault of the server)")
            raise MlflowException(
                f"the server failed to classify this request ({type(exc).__name__}: {exc}); "
                "the fault is the server's, not the request's: retry, or see the server's log",
                error_code=INTERNAL_ERROR,
            ) from exc

    def request_clips(self, model_input) -> tuple[np.ndarray, np.ndarray]:
        """(B x N x S x S x 3 frames, B x N masks) of the request's videos; a VideoError naming
        the row for the first one that cannot be classified."""
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        files: list[tuple[int, Path, bool]] = []
        try:
            for item in request_videos(model_input):
                files.append(item)
            frames, masks = [], []
            budget = FrameBudget(int(env_number(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES)))
            for row, path, _ in files:
                try:
                    clip, mask = clip_frames(path, self.classifier.pre, budget)
                except OverFrameBudget as exc:
                    raise VideoError(f"row {row}: {exc}") from exc
                except TooFewFrames as exc:  # without the (temporary) file's name
                    raise VideoError(f"row {row}: {exc.reason}") from exc
                except VideoError as exc:
                    raise VideoError(
                        f"row {row}: not a readable video ({str(exc).split(': ', 1)[-1]})"
                    ) from exc
                frames.append(clip)
                masks.append(mask)
        finally:
            for _, path, temporary in files:
                if temporary:
                    path.unlink(missing_ok=True)
        return np.stack(frames), np.stack(masks)


def model_signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema(
        [ColSpec("string", "video", required=False), ColSpec("string", "path", required=False)]
    )
    outputs = Schema(
        [ColSpec("string", "top_action"), ColSpec("double", "top_probability")]
        + [ColSpec("double", c) for c in classes]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


MODEL_CODE = Path(__file__).parent / "model_code"  # what MLflow runs to rebuild a pyfunc


def example_request(pre: dict) -> pd.DataFrame:
    """One request row as a client sends it: a short video (frames of random noise, enough
    of them for the model's `min_frames`) as base64 in `video`. Logged with the model, it shows
    `mlflow models serve` users what to send, and MLflow checks that the logged model answers
    it."""
    from pipeline.data.video import write_video

    count = max(int(pre.get("min_frames") or 1), int(pre["frames"]["num_frames"])) + 2
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "example.avi"
        write_video(video, frames, fps=10.0)
        encoded = base64.b64encode(video.read_bytes()).decode("ascii")
    return pd.DataFrame({"video": [encoded]})


def log_classifier_pyfunc(
    name: str, model_code: str, artifacts: dict, classes: list[str], example: pd.DataFrame
):
    """Log the pyfunc of `model_code` (a file of MODEL_CODE) in the active run as `name`, with
    the `pipeline` package as its code (it loads where the project is not installed, e.g. the
    image of `make serving-image`), the serving requirements pinned, its signature and
    `example` request. Returns ModelInfo."""
    from importlib.metadata import version

    requirements = [f"{dist}=={version(dist)}" for dist in SERVING_DISTRIBUTIONS]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(MODEL_CODE / model_code),
        artifacts=artifacts,
        code_paths=[str(Path(__file__).resolve().parents[1])],
        signature=model_signature(classes),
        input_example=example,
        pip_requirements=requirements,
    )


def log_video_classifier(model_file: Path, pre: dict, name: str = "model"):
    """Log the trained model in the active run as `name` (the model's own, e.g. `cnn3d`): a
    VideoClassifierModel pyfunc carrying the .keras file, its preprocessing and the pipeline
    code. Returns MLflow's ModelInfo."""
    from pipeline.config import resolve

    with tempfile.TemporaryDirectory() as tmp:
        pre_file = Path(tmp) / "preprocessing.json"
        pre_file.write_text(json.dumps(pre, indent=2))
        artifacts = {"keras_model": str(model_file), "preprocessing": str(pre_file)}
        weights = pre.get("features", {}).get("weights")
        if weights not in (None, "imagenet"):
            artifacts["backbone_weights"] = str(resolve(weights))
        return log_classifier_pyfunc(
            name, "video_classifier.py", artifacts, pre["classes"], example_request(pre)
        )


def load_video_classifier(uri: str) -> tuple[VideoClassifier, object]:
    """(VideoClassifier, PyFuncModel) of an MLflow model URI or local model folder."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(uri)
    try:
        classifier = getattr(model.unwrap_python_model(), "classifier", None)
    except MlflowException:  # another flavour, e.g. a bare Keras model
        classifier = None
    if classifier is None:
        raise PipelineError(
            f"{uri} is not a video classifier logged by this pipeline (no "
            f"preprocessing with it); retrain it, e.g. `dvc repro -f train@<model>`"
        )
    return classifier, model
