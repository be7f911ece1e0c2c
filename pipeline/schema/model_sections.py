"""`models.*`: the three models' settings (see `pipeline.schema`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.schema.base import (
    BACKBONES,
    Count,
    Fraction,
    Natural,
    NonNegative,
    Positive,
    Rate,
    Section,
    Text,
)


class EarlyStopping(Section):
    monitor: Literal["val_loss", "val_accuracy"]
    patience: Natural


class StepDecay(Section):
    decay_steps: Count
    decay_rate: Annotated[float, Field(gt=0, le=1)]


class Training(Section):
    optimizer: Literal["adam", "adamw"]
    weight_decay: NonNegative = 0.004
    learning_rate: Positive
    lr_decay: Literal["cosine"] | StepDecay | None = None
    warmup_epochs: NonNegative = 0
    batch_size: Count
    epochs: Count
    early_stopping: EarlyStopping
    class_weights: bool
    oversample: bool
    jit_compile: bool = False

    @model_validator(mode="after")
    def warmup_needs_cosine(self):
        if self.warmup_epochs and self.lr_decay != "cosine":
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs:g} needs lr_decay: cosine "
                f"(lr_decay is {self.lr_decay!r})"
            )
        return self


class Head(Section):
    units: list[Count]
    dropout: list[Rate]

    @model_validator(mode="after")
    def one_dropout_per_layer(self):
        if len(self.units) != len(self.dropout):
            raise ValueError(
                f"units {self.units} and dropout {self.dropout} need one entry per layer"
            )
        return self


class ClipAugment(Section):
    flip: bool = False
    hue: Fraction | None = None
    saturation: Fraction | None = None
    brightness: Fraction | None = None
    contrast: Fraction | None = None


class FrameBackbone(Section):
    name: BACKBONES
    weights: Text | None  # imagenet | null | a weights file
    trainable_layers: Literal["all"] | Natural
    batchnorm_momentum: Annotated[float, Field(gt=0, lt=1)] | None
    zero_init_residual: bool


Motion = Literal["rgb", "diff", "rgb_diff"]
TemporalPooling = Literal["mean", "mean_max", "temporal_conv"]


class FrameModel(Section):
    """What the two models on cached frames share."""

    input: Literal["frames"]
    num_frames: Count | None
    motion: Motion = "rgb"
    temporal_pooling: TemporalPooling = "mean"
    tta_hflip: bool = False  # test-time averaging over each clip and its mirror image
    clip_augment: ClipAugment | None = None
    head: Head
    train: Training


class FrameCnn(FrameModel):
    name: Literal["frame_cnn"]
    backbone: FrameBackbone


class Conv3d(Section):
    filters: list[Count]
    kernel_size: Count
    padding: list[Literal["same", "valid"]]
    pool_size: list[Count]
    batchnorm_momentum: Annotated[float, Field(gt=0, lt=1)] | None

    @model_validator(mode="after")
    def one_padding_per_layer(self):
        if len(self.filters) != len(self.padding):
            raise ValueError(f"filters {self.filters} and padding {self.padding} differ in length")
        return self


class Cnn3d(FrameModel):
    name: Literal["cnn3d"]
    conv: Conv3d


class CnnGru(Section):
    name: Literal["cnn_gru"]
    input: Literal["features"]
    num_frames: Count | None
    feature_motion: Literal["none", "diff", "concat"] = "none"
    normalize_features: bool = True
    input_dropout: Rate = 0.0
    gru_units: Annotated[list[Count], Field(min_length=1)]
    dropout: Rate
    dense_units: list[Count]
    train: Training


class Models(Section):
    frame_cnn: FrameCnn
    cnn3d: Cnn3d
    cnn_gru: CnnGru
