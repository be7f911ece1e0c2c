"""Keras application backbones with `weights: imagenet | null | <local file>`."""

from __future__ import annotations

from pathlib import Path

import keras

from pipeline.common import PipelineError, resolve

APPLICATIONS = {
    "resnet101v2": (keras.applications.ResNet101V2, keras.applications.resnet_v2.preprocess_input),
    "efficientnetb0": (keras.applications.EfficientNetB0,
                       keras.applications.efficientnet.preprocess_input),
}


class WeightsUnavailable(PipelineError):
    """The configured backbone weights could not be loaded; the message names the config key."""


def build_backbone(name: str, weights: str | None, input_shape: tuple[int, int, int],
                   config_key: str, pooling: str | None = None) -> keras.Model:
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
                f"({type(exc).__name__}: {exc})") from exc
        raise


def preprocess_for(name: str):
    """The backbone's own input preprocessing (expects RGB in 0..255)."""
    return APPLICATIONS[name][1]
