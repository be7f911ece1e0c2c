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
    run_eagerly: bool = False  # op by op: no graph tracing (tens of seconds for EfficientNetB0)
    ema_momentum: Annotated[float, Field(gt=0, lt=1)] | None = None
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    temporal_jitter: bool = False  # each epoch, frames drawn afresh from the cached ones
    mixup: NonNegative = 0.0  # Beta(alpha, alpha) of each training clip's blend; 0: off
    networks: Count = 1  # fitted from their own seeds, probabilities averaged (members.py)

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
    # the side the backbone sees each frame at (resized inside the model); null: the frame size
    input_size: Annotated[int, Field(ge=32)] | None = None
    # the backbone ends at this layer (e.g. block5c_add: its first 5 stages); null: the whole
    output_layer: Text | None = None


Motion = Literal["rgb", "diff", "rgb_diff", "flow", "rgb_flow"]
FLOW_MOTIONS = ("flow", "rgb_flow")
TemporalPooling = Literal["mean", "mean_max", "temporal_conv"]


class FrameModel(Section):
    """What the two models on cached frames share."""

    input: Literal["frames"]
    num_frames: Count | None
    motion: Motion = "rgb"
    temporal_pooling: TemporalPooling = "mean"
    tta_hflip: bool = False  # test-time averaging over each clip and its mirror image
    tta_views: bool = False  # test-time averaging over interleaved views of the cached frames
    clip_augment: ClipAugment | None = None
    head: Head
    train: Training

    @property
    def reads_flow(self) -> bool:
        """Whether the model reads the cached optical flow next to the frames."""
        return self.motion in FLOW_MOTIONS

    @model_validator(mode="after")
    def no_clip_augment_on_flow(self):
        if self.clip_augment is not None and self.motion in FLOW_MOTIONS:
            raise ValueError(
                f"clip_augment flips and recolours RGB frames inside the model, not their "
                f"optical flow (motion {self.motion!r}): set clip_augment null or motion rgb"
            )
        return self


class FrameCnn(FrameModel):
    name: Literal["frame_cnn"]
    backbone: FrameBackbone

    @model_validator(mode="after")
    def pretrained_weights_take_three_channels(self):
        if self.motion not in ("rgb", "diff") and self.backbone.weights is not None:
            raise ValueError(
                f"motion {self.motion!r} gives the backbone more or fewer than 3 channels, "
                f"which pretrained weights ({self.backbone.weights}) do not take: "
                "set backbone.weights null or motion rgb or diff"
            )
        if self.backbone.zero_init_residual and self.backbone.weights is not None:
            raise ValueError(
                "backbone.zero_init_residual=true would erase the pretrained weights "
                f"({self.backbone.weights}): it is for random init (backbone.weights null)"
            )
        return self


class Conv3d(Section):
    filters: list[Count]
    kernel_size: Count
    padding: list[Literal["same", "valid"]]
    pool_size: list[Count]
    norm: Literal["batch", "group"] = "batch"
    groups: Count = 4
    batchnorm_momentum: Annotated[float, Field(gt=0, lt=1)] | None

    @model_validator(mode="after")
    def one_padding_per_layer(self):
        if len(self.filters) != len(self.padding):
            raise ValueError(f"filters {self.filters} and padding {self.padding} differ in length")
        if self.norm == "group" and any(f % self.groups for f in self.filters):
            raise ValueError(
                f"norm group: every layer's filters {self.filters} must divide into "
                f"groups={self.groups}"
            )
        return self


class Cnn3d(FrameModel):
    name: Literal["cnn3d"]
    conv: Conv3d


class CnnGru(Section):
    name: Literal["cnn_gru"]
    input: Literal["features"]
    num_frames: Count | None
    feature_motion: Literal["none", "diff", "concat"] = "none"
    flow_grid: Natural = 0  # each frame's optical flow pooled over g x g cells; 0: none
    tta_views: bool = False  # test-time averaging over interleaved views of the cached frames
    normalize_features: bool = True
    input_dropout: Rate = 0.0
    gru_units: Annotated[list[Count], Field(min_length=1)]
    dropout: Rate
    dense_units: list[Count]
    train: Training

    @property
    def reads_flow(self) -> bool:
        """Whether the model reads each frame's optical flow pooled over a grid."""
        return self.flow_grid > 0

    @model_validator(mode="after")
    def no_oversampling_with_flow_or_jitter(self):
        if self.flow_grid and self.train.oversample:
            raise ValueError(
                f"flow_grid={self.flow_grid} with train.oversample=true: the augmented "
                "copies' cached features have no flow; use class weights (oversample false)"
            )
        if self.train.temporal_jitter and self.train.oversample:
            raise ValueError(
                "train.temporal_jitter with train.oversample=true: the augmented copies' "
                "cached features have fixed frames; use class weights (oversample false)"
            )
        return self


ModelSection = FrameCnn | Cnn3d | CnnGru  # one of `models.*`


class Models(Section):
    frame_cnn: FrameCnn
    cnn3d: Cnn3d
    cnn_gru: CnnGru

    def with_mixup(self) -> list[str]:
        """`models.<name>.train.mixup=<alpha>` of each model that trains with mixup."""
        return [f"models.{n}.train.mixup={m.train.mixup:g}" for n, m in self if m.train.mixup]

    def named(self, name: str) -> ModelSection:
        """The section of model `name`; a clear error for a name that is none of them."""
        if name not in type(self).model_fields:
            raise ValueError(
                f"no model {name!r} under models: one of {sorted(type(self).model_fields)}"
            )
        return getattr(self, name)
