"""The three classifiers, each built by a short function from its config section.

Shapes in comments: B batch, T frames, S frame size, C classes.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from pipeline.backbones import build_backbone


def dense_head(x, units: list[int], dropout: list[float]):
    if len(units) != len(dropout):
        raise ValueError(f"head units {units} and dropout {dropout} differ in length")
    for n, rate in zip(units, dropout):
        x = layers.Dense(n, activation="relu")(x)
        x = layers.Dropout(rate)(x)
    return x


def build_frame_cnn(cfg: dict, num_frames: int, size: int, num_classes: int) -> keras.Model:
    """EfficientNetB0 on every frame (shared weights), pooled over time and space, dense head."""
    bb = cfg["backbone"]
    backbone = build_backbone(bb["name"], bb["weights"], (size, size, 3),
                              config_key="models.frame_cnn.backbone.weights")
    trainable = int(bb["trainable_layers"])
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= len(backbone.layers) - trainable
    inputs = keras.Input((num_frames, size, size, 3), name="frames")   # B,T,S,S,3 (0..255)
    # The frames are folded into the batch rather than wrapped in TimeDistributed: Keras 3's
    # TimeDistributed unrolls one backbone copy per frame (minutes of graph tracing on CPU).
    x = ops.reshape(inputs, (-1, size, size, 3))                        # B*T,S,S,3
    x = backbone(x)                                                     # B*T,s,s,1280
    x = ops.reshape(x, (-1, num_frames) + tuple(x.shape[1:]))           # B,T,s,s,1280
    x = layers.GlobalAveragePooling3D()(x)                              # B,1280
    x = dense_head(x, cfg["head"]["units"], cfg["head"]["dropout"])     # B,64
    outputs = layers.Dense(num_classes, activation="softmax")(x)        # B,C
    return keras.Model(inputs, outputs, name="frame_cnn")


def build_cnn3d(cfg: dict, num_frames: int, size: int, num_classes: int) -> keras.Model:
    """Conv3D blocks (conv -> MaxPool3D -> BatchNorm) from scratch, GAP3D, dense head."""
    conv = cfg["conv"]
    if len(conv["filters"]) != len(conv["padding"]):
        raise ValueError("models.cnn3d.conv.filters and conv.padding differ in length")
    inputs = keras.Input((num_frames, size, size, 3), name="frames")   # B,T,S,S,3 (0..255)
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters, padding in zip(conv["filters"], conv["padding"]):
        x = layers.Conv3D(filters, conv["kernel_size"], padding=padding, activation="relu")(x)
        if min(x.shape[1:4]) < 1 or any(s < p for s, p in zip(x.shape[1:4], conv["pool_size"])):
            raise ValueError(f"cnn3d: a {num_frames}x{size}x{size} input shrinks to "
                             f"{tuple(x.shape[1:4])} before pooling; raise frames.size or the "
                             f"model's num_frames (reference: 10x224x224; smallest: 5x80x80)")
        x = layers.MaxPool3D(tuple(conv["pool_size"]))(x)   # time kept, space halved
        x = layers.BatchNormalization(momentum=float(conv.get("batchnorm_momentum", 0.99)))(x)
    # reference 10x224x224: 3 x (same conv, pool) -> B,10,28,28,128; valid conv -> B,8,26,26,256;
    # pool -> B,8,13,13,256; valid conv -> B,6,11,11,512; pool -> B,6,5,5,512
    x = layers.GlobalAveragePooling3D()(x)                              # B,512
    x = dense_head(x, cfg["head"]["units"], cfg["head"]["dropout"])     # B,32
    outputs = layers.Dense(num_classes, activation="softmax")(x)        # B,C
    return keras.Model(inputs, outputs, name="cnn3d")


def build_cnn_gru(cfg: dict, num_frames: int, feature_dim: int, num_classes: int) -> keras.Model:
    """Stacked GRUs over per-frame backbone features; repeated frames are masked out."""
    features = keras.Input((num_frames, feature_dim), name="features")  # B,T,2048
    mask = keras.Input((num_frames,), dtype="bool", name="mask")        # B,T
    units = list(cfg["gru_units"])
    x = features
    if cfg.get("normalize_features", True):
        # Per-dimension standardisation, adapted on the training features before fitting:
        # features of a randomly initialised backbone are tiny and near-constant without it.
        x = layers.Normalization(axis=-1, name="feature_norm")(x)       # B,T,2048
    for i, n in enumerate(units):
        x = layers.GRU(n, return_sequences=i < len(units) - 1)(x, mask=mask)
    # B,T,16 -> B,10
    x = layers.Dropout(cfg["dropout"])(x)
    for n in cfg["dense_units"]:
        x = layers.Dense(n, activation="relu")(x)                       # B,7 -> B,6
    outputs = layers.Dense(num_classes, activation="softmax")(x)        # B,C
    return keras.Model([features, mask], outputs, name="cnn_gru")


BUILDERS = {"frame_cnn": build_frame_cnn, "cnn3d": build_cnn3d, "cnn_gru": build_cnn_gru}
