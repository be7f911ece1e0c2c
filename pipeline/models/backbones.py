"""Keras application backbones with `weights: imagenet | null | <local file>`, and the per-frame
features they give (with an optional motion stream of frame changes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from pipeline.config import resolve
from pipeline.errors import PipelineError
from pipeline.models.runtimes import OpenVinoModel, feature_runtime

APPLICATIONS = {
    "resnet101v2": (keras.applications.ResNet101V2, keras.applications.resnet_v2.preprocess_input),
    "efficientnetb0": (
        keras.applications.EfficientNetB0,
        keras.applications.efficientnet.preprocess_input,
    ),
}


class WeightsUnavailable(PipelineError):
    """The configured backbone weights could not be loaded; the message names the config key."""


def build_backbone(
    name: str,
    weights: str | None,
    input_shape: tuple[int, int, int],
    config_key: str,
    pooling: str | None = None,
) -> keras.Model:
    """A headless backbone; `config_key` (e.g. `features.weights`) is named in any error."""
    if name not in APPLICATIONS:
        raise ValueError(f"{config_key}: unknown backbone {name!r}; one of {sorted(APPLICATIONS)}")
    builder, _ = APPLICATIONS[name]
    if weights not in (None, "imagenet"):
        path = resolve(str(weights))
        if not Path(path).is_file():
            raise WeightsUnavailable(f"{config_key}={weights}: no such weights file")
        weights = str(path)
    try:
        return builder(include_top=False, weights=weights, input_shape=input_shape, pooling=pooling)
    except Exception as exc:  # download failures surface as many exception types
        if weights == "imagenet":
            raise WeightsUnavailable(
                f"{config_key}=imagenet: the ImageNet weights for {name} could not be loaded "
                f"({type(exc).__name__}: {exc}). Without internet access, set {config_key}=null "
                f"(random init) or to a local weights file (.h5/.weights.h5) for {name} without "
                f"its top."
            ) from exc
        if weights is not None:
            raise WeightsUnavailable(
                f"{config_key}={weights}: not usable as {name} weights without its top "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        raise


class UnknownLayer(PipelineError):
    """A configured backbone layer name is not one of the backbone's layers."""


def truncated_at(
    backbone: keras.Model, output_layer: str | None, config_key: str, pooling: str | None = None
) -> keras.Model:
    """The backbone up to and including `output_layer` (the backbone itself when None), under
    the backbone's name, its output averaged over space with `pooling="avg"`. Its layers are
    shared, not copied: weights already set stay set."""
    if output_layer is None:
        return backbone
    names = [layer.name for layer in backbone.layers]
    if output_layer not in names:
        stage_ends = [n for n in names if n.endswith(("_add", "_out", "top_activation"))]
        raise UnknownLayer(
            f"{config_key}={output_layer}: {backbone.name} has no such layer; the ends of its "
            f"residual blocks are {', '.join(stage_ends)} (null: the whole backbone)"
        )
    x = backbone.get_layer(output_layer).output  # B,h,w,F
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)  # B,F
    return keras.Model(backbone.input, x, name=backbone.name)


def build_pooled_backbone(name: str, weights: str | None, size: int, output_layer: str | None):
    """The features backbone on size x size RGB frames: up to `output_layer` (the whole
    network when None), its output averaged over space (B,F). `features.*` keys in errors."""
    backbone = build_backbone(
        name,
        weights,
        (size, size, 3),
        config_key="features.weights",
        pooling=None if output_layer else "avg",
    )
    return truncated_at(backbone, output_layer, "features.output_layer", pooling="avg")


def zero_init_residual_branches(backbone: keras.Model) -> int:
    """Set to 0 the scale (gamma) of the last BatchNorm of every residual branch of an
    EfficientNet (`blockNx_project_bn` where `blockNx_add` adds it to the shortcut), so that
    every residual block of a randomly initialised network starts as the identity (Goyal et al.
    2017, "zero-gamma"). Returns the number of branches; raises if the backbone has none."""
    names = {layer.name for layer in backbone.layers}
    count = 0
    for layer in backbone.layers:
        if not layer.name.endswith("_add"):
            continue
        branch_end = layer.name.removesuffix("_add") + "_project_bn"
        if branch_end not in names:
            raise ValueError(f"{backbone.name}: residual {layer.name} has no {branch_end}")
        gamma = backbone.get_layer(branch_end).gamma
        gamma.assign(keras.ops.zeros_like(gamma))
        count += 1
    if not count:
        raise ValueError(f"{backbone.name} has no EfficientNet residual blocks (`*_add`)")
    return count


def build_feature_backbone(cfg: dict, size: int, weights=None, initial=None):
    """The features backbone (up to `output_layer`, averaged over space) of the `features`
    section `cfg` as `feature_runtime` resolves its runtime and precision. Call
    `seed_everything` first: with `weights: null` the random weights come from the seed,
    whatever the runtime. `initial`: the weights (`get_weights()`) of this backbone as another
    process built it, set before the runtime takes the model. Returns (backbone, preprocess,
    (runtime, precision))."""
    runtime, precision = feature_runtime(cfg)
    previous = keras.config.dtype_policy()
    if runtime == "keras" and precision == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")  # float32 weights, bfloat16 compute
    try:
        backbone = build_pooled_backbone(
            cfg["backbone"],
            weights if weights is not None else cfg["weights"],
            size,
            cfg.get("output_layer"),  # absent from models logged before the key existed
        )
    finally:
        keras.config.set_dtype_policy(previous)
    if initial is not None:
        backbone.set_weights(initial)
    if runtime == "openvino":
        backbone = OpenVinoModel(backbone, precision)
    return backbone, preprocess_for(cfg["backbone"]), (runtime, precision)


def preprocess_for(name: str):
    """The backbone's own input preprocessing (expects RGB in 0..255)."""
    return APPLICATIONS[name][1]


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """(clips x N x H x W x 3 uint8) -> float32 images of each frame's change since the
    previous one, centred on mid-grey (127.5; the first frame and repeats show no change)."""
    f = np.asarray(frames, dtype=np.float32)
    change = np.zeros_like(f)
    change[:, 1:] = f[:, 1:] - f[:, :-1]
    return change * 0.5 + 127.5


def feature_width(backbone, motion: bool) -> int:
    """The width of one frame's features: the backbone's, twice that with the motion stream."""
    return backbone.output_shape[-1] * (2 if motion else 1)


def frame_features(
    backbone,
    preprocess,
    frames: np.ndarray,
    batch_size: int,
    desc: str = "features",
    out: np.ndarray | None = None,
    motion: bool = False,
) -> np.ndarray:
    """(clips x N x H x W x 3 uint8) -> (clips x N x D float32), batch_size frames at a time;
    with `motion`, D is twice the backbone's width: the features of `frame_changes` follow.

    `frames` may be a memory map and `out` a preallocated (memory-mapped) result: only one
    batch of frames (or a few clips' changes) is in memory at a time. An empty `desc` hides the
    progress bar (callers with their own bar over clips).
    """
    if motion:
        clips, n = frames.shape[:2]
        dim = backbone.output_shape[-1]
        if out is None:
            out = np.zeros((clips, n, 2 * dim), dtype=np.float32)
        step = max(1, batch_size // n)  # clips per pass: about one batch of frames
        for start in tqdm(
            range(0, clips, step), desc=desc and f"{desc} (+motion)", unit="pass", disable=not desc
        ):
            part = frames[start : start + step]
            out[start : start + step, :, :dim] = frame_features(
                backbone, preprocess, part, batch_size, desc=""
            )
            out[start : start + step, :, dim:] = frame_features(
                backbone, preprocess, frame_changes(part), batch_size, desc=""
            )
        return out
    clips, n = frames.shape[:2]
    flat = frames.reshape((clips * n,) + frames.shape[2:])
    dim = backbone.output_shape[-1]
    if out is None:
        out = np.zeros((clips, n, dim), dtype=np.float32)
    flat_out = out.reshape(clips * n, dim)
    batch = np.zeros((batch_size,) + flat.shape[1:], dtype=np.float32)
    for start in tqdm(range(0, len(flat), batch_size), desc=desc, unit="batch", disable=not desc):
        chunk = flat[start : start + batch_size]
        batch[: len(chunk)] = chunk  # a fixed batch shape avoids retracing for the last batch
        batch[len(chunk) :] = 0
        features = backbone.predict_on_batch(preprocess(batch.copy()))[: len(chunk)]
        flat_out[start : start + len(chunk)] = np.asarray(features, np.float32)  # from bfloat16
    return out


def weights_digest(weights: list[np.ndarray]) -> str:
    """sha256 over a model's weights (`get_weights()`), in order."""
    digest = hashlib.sha256()
    for w in weights:
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()
