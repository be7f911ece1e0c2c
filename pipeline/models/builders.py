"""The three classifiers, each built by a short function from its config section.

Shapes in comments: B batch, T frames, S frame size, C classes, I channels read (3 RGB, 5
when the motion uses optical flow: RGB and flow, see `pipeline.data.flow`), K channels the
network sees (`MOTION_CHANNELS`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import keras
from keras import layers, ops

from pipeline.data.flow import FLOW_CHANNELS, RGB_CHANNELS
from pipeline.models.backbones import build_backbone, truncated_at, zero_init_residual_branches
from pipeline.schema.model_sections import FLOW_MOTIONS

if TYPE_CHECKING:
    from pipeline.schema.model_sections import (
        ClipAugment,
        Cnn3d,
        CnnGru,
        Conv3d,
        FrameCnn,
        FrameModel,
        Head,
    )

# what a frame model sees of each frame -> its channels
MOTION_CHANNELS = {"rgb": 3, "diff": 3, "rgb_diff": 6, "flow": 2, "rgb_flow": 5}


def dense_head(x, head: Head):
    for n, rate in zip(head.units, head.dropout):
        x = layers.Dense(n, activation="relu")(x)
        x = layers.Dropout(rate)(x)
    return x


def change_since_previous(x):
    """B,T,... -> B,T,...: each step minus the one before it (0 for the first step)."""
    change = x[:, 1:] - x[:, :-1]  # B,T-1,...
    return ops.concatenate([ops.zeros_like(x[:, :1]), change], axis=1)


def input_channels(motion: str) -> int:
    """Channels a frame model reads per frame: RGB, and the cached optical flow after them
    when its motion uses flow."""
    return RGB_CHANNELS + (FLOW_CHANNELS if motion in FLOW_MOTIONS else 0)


def motion_input(frames, motion: str):
    """What the network sees of a clip (B,T,S,S,I in 0..255): the frames (`rgb`, the
    reference), the change from the previous frame (`diff`, centred on mid-grey, 0 for the
    first frame and for repeated frames), both stacked as channels (`rgb_diff`), the optical
    flow towards the next video frame (`flow`, 128 = still) or frames and flow (`rgb_flow`)."""
    if motion in ("rgb", "rgb_flow"):
        return frames  # B,T,S,S,3 | B,T,S,S,5
    if motion == "flow":
        return frames[..., RGB_CHANNELS:]  # B,T,S,S,2
    diff = change_since_previous(frames) * 0.5 + 127.5  # B,T,S,S,3 in 0..255
    return diff if motion == "diff" else ops.concatenate([frames, diff], axis=-1)  # B,T,S,S,6


def clip_augment(frames, augment: ClipAugment | None, size: int, num_frames: int):
    """Random changes of each training clip, the same for all its frames, so that motion is
    kept: a horizontal flip and colour jitter (hue, saturation, brightness, contrast).
    Active in training only (Keras preprocessing layers pass inputs through at inference).
    Colours a small training set ties to one class (jerseys, courts) stop being a shortcut.
    B,T,S,S,3 (0..255) -> B,T,S,S,3; clips with optical flow (B,T,S,S,5) are refused: a
    flip would have to reverse the flow too (the schema refuses it)."""
    if augment is None:
        return frames
    x = ops.reshape(frames, (-1, num_frames * size, size, 3))  # B,T*S,S,3: one image
    if augment.flip:
        x = layers.RandomFlip("horizontal")(x)
    jitter = (augment.hue, augment.saturation, augment.brightness, augment.contrast)
    if any(jitter):
        x = layers.RandomColorJitter(
            value_range=(0, 255),
            hue_factor=augment.hue,
            saturation_factor=augment.saturation,
            brightness_factor=augment.brightness,
            contrast_factor=augment.contrast,
        )(x)
    return ops.reshape(x, (-1, num_frames, size, size, 3))


def temporal_pool(x, pooling: str):
    """B,T,h,w,D -> one vector per clip: `mean` (GlobalAveragePooling3D, the reference; B,D),
    `mean_max` (each frame's spatial mean, then its mean and max over time; B,2D) or
    `temporal_conv` (each frame's spatial mean, a ReLU 1-D convolution over 3 neighbouring
    frames, then mean and max over time; B,512): the last sees the order of frames."""
    if pooling == "mean":
        return layers.GlobalAveragePooling3D()(x)
    per_frame = ops.mean(x, axis=(2, 3))  # B,T,D
    if pooling == "temporal_conv":
        per_frame = layers.Conv1D(256, 3, padding="same", activation="relu")(per_frame)  # B,T,256
    return layers.Concatenate()([ops.mean(per_frame, axis=1), ops.max(per_frame, axis=1)])


def pooled_classifier(x, cfg: FrameModel, num_classes: int):
    """B,T,h,w,D -> B,C: `temporal_pool` (B,D; mean_max B,2D), the dense head, softmax."""
    x = temporal_pool(x, cfg.temporal_pooling)
    x = dense_head(x, cfg.head)
    return layers.Dense(num_classes, activation="softmax")(x)


def set_batchnorm_momentum(model: keras.Model, momentum: float | None) -> None:
    """Every BatchNormalization layer of `model` averages its statistics with `momentum`
    (None keeps Keras' 0.99, too slow when an epoch has few steps)."""
    if momentum is None:
        return
    for layer in model._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)


def build_frame_cnn(cfg: FrameCnn, num_frames: int, size: int, num_classes: int) -> keras.Model:
    """EfficientNetB0 on every frame (shared weights), pooled over time and space, dense head;
    each frame resized to `backbone.input_size` first when that is set. (The schema refuses
    pretrained weights for other than 3 channels, or zero-initialised.)"""
    bb = cfg.backbone
    channels = MOTION_CHANNELS[cfg.motion]
    seen = bb.input_size or size  # the side the backbone sees
    with warnings.catch_warnings():  # other than 3 channels: random init, by the schema
        warnings.filterwarnings("ignore", "This model usually expects 1 or 3 input channels")
        backbone = build_backbone(
            bb.name, bb.weights, (seen, seen, channels), "models.frame_cnn.backbone.weights"
        )
    if bb.zero_init_residual:
        zero_init_residual_branches(backbone)  # every residual block starts as the identity
    backbone = truncated_at(backbone, bb.output_layer, "models.frame_cnn.backbone.output_layer")
    trainable = len(backbone.layers) if bb.trainable_layers == "all" else bb.trainable_layers
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= len(backbone.layers) - trainable
    set_batchnorm_momentum(backbone, bb.batchnorm_momentum)
    inputs = keras.Input((num_frames, size, size, input_channels(cfg.motion)), name="frames")
    # B,T,S,S,I (0..255)
    x = clip_augment(inputs, cfg.clip_augment, size, num_frames)
    x = motion_input(x, cfg.motion)  # B,T,S,S,K
    # The frames are folded into the batch rather than wrapped in TimeDistributed: Keras 3's
    # TimeDistributed unrolls one backbone copy per frame (minutes of graph tracing on CPU).
    x = ops.reshape(x, (-1, size, size, channels))  # B*T,S,S,K
    if seen != size:
        x = layers.Resizing(seen, seen, interpolation="bilinear")(x)  # B*T,S',S',K
    x = backbone(x)  # B*T,s,s,F: F 1280 (its top), 112 at block5c_add
    x = ops.reshape(x, (-1, num_frames) + tuple(x.shape[1:]))  # B,T,s,s,F
    outputs = pooled_classifier(x, cfg, num_classes)  # B,F -> B,64 -> B,C
    return keras.Model(inputs, outputs, name="frame_cnn")


def normalization(conv: Conv3d):
    """cnn3d's layer after each pooled convolution: BatchNormalization (the reference) or,
    with `norm: group`, GroupNormalization, whose statistics come from each clip alone."""
    if conv.norm == "group":
        return layers.GroupNormalization(groups=conv.groups)
    return layers.BatchNormalization(momentum=conv.batchnorm_momentum or 0.99)


def build_cnn3d(cfg: Cnn3d, num_frames: int, size: int, num_classes: int) -> keras.Model:
    """Conv3D blocks (conv -> MaxPool3D -> BatchNorm) from scratch, GAP3D, dense head."""
    conv = cfg.conv
    inputs = keras.Input((num_frames, size, size, input_channels(cfg.motion)), name="frames")
    # B,T,S,S,I (0..255)
    x = clip_augment(inputs, cfg.clip_augment, size, num_frames)
    x = motion_input(x, cfg.motion)  # B,T,S,S,K
    x = layers.Rescaling(1.0 / 255)(x)
    for filters, padding in zip(conv.filters, conv.padding):
        x = layers.Conv3D(filters, conv.kernel_size, padding=padding, activation="relu")(x)
        if min(x.shape[1:4]) < 1 or any(s < p for s, p in zip(x.shape[1:4], conv.pool_size)):
            raise ValueError(
                f"cnn3d: a {num_frames}x{size}x{size} input shrinks to "
                f"{tuple(x.shape[1:4])} before pooling; raise frames.size or the "
                f"model's num_frames (reference: 10x224x224; smallest: 5x80x80)"
            )
        x = layers.MaxPool3D(tuple(conv.pool_size))(x)  # time kept, space halved
        x = normalization(conv)(x)
    # reference 10x224x224: 3 x (same conv, pool) -> B,10,28,28,128; valid conv -> B,8,26,26,256;
    # pool -> B,8,13,13,256; valid conv -> B,6,11,11,512; pool -> B,6,5,5,512
    outputs = pooled_classifier(x, cfg, num_classes)  # B,512 -> B,32 -> B,C
    return keras.Model(inputs, outputs, name="cnn3d")


def build_cnn_gru(cfg: CnnGru, num_frames: int, feature_dim: int, num_classes: int) -> keras.Model:
    """Stacked GRUs over per-frame backbone features; padding frames are masked out.

    The mask must be right-padded (valid frames first, see `pipeline.data.arrays.right_align`):
    that is the only layout cuDNN's GRU accepts on a GPU.
    """
    # B,T,D: W per frame (the features backbone's width: 2048 for the whole ResNet101V2, 256 at
    # conv2_block3_out), x2 with the features' motion stream, + 2*g*g with `flow_grid`
    features = keras.Input((num_frames, feature_dim), name="features")
    mask = keras.Input((num_frames,), dtype="bool", name="mask")  # B,T
    x = features
    if cfg.normalize_features:
        # Per-dimension standardisation, adapted on the training features before fitting:
        # features of a randomly initialised backbone are tiny and near-constant without it.
        x = layers.Normalization(axis=-1, name="feature_norm")(x)  # B,T,D
    if cfg.feature_motion != "none":
        # each frame's change of features since the previous frame: what moved, without
        # the scene's constant look; the pooled flow (the last F = 2*g*g values) is motion
        # already and passes as it is
        flow_dims = FLOW_CHANNELS * cfg.flow_grid**2
        looks, flow = x[..., : feature_dim - flow_dims], x[..., feature_dim - flow_dims :]
        change = change_since_previous(looks)  # B,T,D-F
        x = (
            change if cfg.feature_motion == "diff" else layers.Concatenate()([looks, change])
        )  # D-F | 2(D-F)
        if flow_dims:
            x = layers.Concatenate()([x, flow])  # B,T,...+F
    if cfg.input_dropout:
        x = layers.Dropout(cfg.input_dropout)(x)
    units = cfg.gru_units
    for i, n in enumerate(units):
        x = layers.GRU(n, return_sequences=i < len(units) - 1)(x, mask=mask)
    # B,T,16 -> B,10
    x = layers.Dropout(cfg.dropout)(x)
    for n in cfg.dense_units:
        x = layers.Dense(n, activation="relu")(x)  # B,7 -> B,6
    outputs = layers.Dense(num_classes, activation="softmax")(x)  # B,C
    return keras.Model([features, mask], outputs, name="cnn_gru")


BUILDERS = {"frame_cnn": build_frame_cnn, "cnn3d": build_cnn3d, "cnn_gru": build_cnn_gru}
