"""Oversampling touches only the training split: balanced classes, originals intact, copies
augmented; cnn_gru's copies come from cached features of augmented frames."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import augment_section

from pipeline.data.arrays import save_arrays
from pipeline.data.augment import augment_clip, jitter_indices, mixed_batch, oversample_indices
from pipeline.errors import PipelineError
from pipeline.schema import parse_params
from pipeline.stages.train import fit_job

AUG = {"hflip": 0.5, "rotation_deg": 5, "blur": 0.2, "noise_std": 4.0, "temporal_jitter": 1}


def job_with(params: dict, name: str, **train):
    """The train stage's FitJob for model `name` of `params`, with `train` settings changed."""
    model = params["models"][name]
    model = {**model, "train": {**model["train"], **train}}
    return fit_job(parse_params({**params, "models": {**params["models"], name: model}}), name)


def clips(n: int, t: int = 6, size: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, t, size, size, 3), dtype=np.uint8)


def test_oversampling_brings_every_class_to_the_largest():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    extra = oversample_indices(labels, np.random.default_rng(0))
    counts = np.bincount(np.concatenate([labels, labels[extra]]))
    assert counts.tolist() == [10, 10, 10]
    assert set(labels[extra[labels[extra] == 2]]) == {2}  # copies come from their own class
    assert len(oversample_indices(np.array([1, 1, 0, 0]), np.random.default_rng(0))) == 0


def test_augmented_copy_differs_keeps_shape_and_is_reproducible():
    frames = clips(1)[0]
    mask = np.ones(6, bool)
    a, ma = augment_clip(frames, mask, augment_section(**AUG), np.random.default_rng(3))
    b, mb = augment_clip(frames, mask, augment_section(**AUG), np.random.default_rng(3))
    assert a.shape == frames.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert np.abs(a.astype(int) - frames.astype(int)).mean() > 1


def test_flip_only_is_an_exact_mirror_of_every_frame():
    frames = clips(1)[0]
    flip = augment_section(hflip=1.0)
    out, _ = augment_clip(frames, np.ones(6, bool), flip, np.random.default_rng(0))
    assert np.array_equal(out, frames[:, :, ::-1])


def test_temporal_jitter_stays_in_order_and_marks_repeats():
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = jitter_indices(8, 2, rng)
        assert np.all(np.diff(idx) >= 0) and idx.min() >= 0 and idx.max() <= 7
    frames = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(8)])
    out, mask = augment_clip(
        frames, np.ones(8, bool), augment_section(temporal_jitter=3), np.random.default_rng(5)
    )
    levels = out[:, 0, 0, 0].astype(int)
    assert np.array_equal(mask[1:], levels[1:] != levels[:-1])


def test_oversampled_epochs_are_balanced_with_untouched_originals(tiny_params):
    from pipeline.models.training_data import training_data

    x = clips(12)
    y = np.array([0] * 8 + [1] * 3 + [2] * 1)
    params, seed = {**tiny_params, "augment": AUG}, tiny_params["seed"]
    job = job_with(params, "cnn3d", batch_size=5, class_weights=True, oversample=True)
    fit = training_data(job, seed, x, y, 3)
    assert fit["class_weight"] is None and "y" not in fit
    data = fit["x"]
    assert fit["steps_per_epoch"] == data.batches_per_epoch == 5  # 24 clips in batches of 5
    for epoch in range(2):
        xs, ys = zip(*data.epoch(epoch))
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        assert np.bincount(ys).tolist() == [8, 8, 8]
        originals = sum(any(np.array_equal(c, o) for o in x) for c in xs)
        assert originals == 12  # each original exactly once; every copy is altered

    job = job_with(params, "cnn3d", batch_size=5, class_weights=True, oversample=False)
    plain = training_data(job, seed, x, y, 3)
    assert plain["x"] is x and plain["class_weight"][2] > plain["class_weight"][0]


def test_mixup_blends_each_clip_and_its_target_with_the_same_partner():
    """Clip k is uniformly k + 1 and the only clip of class k, so a blended clip's target names
    its partner and its share: the clip must be that blend, its mask the union of the two,
    its sample weight the same blend of the two class weights. Reproducible from the rng."""
    size = 8
    x = {
        "features": np.stack([np.full((3, 4), k + 1, np.float32) for k in range(size)]),
        "mask": np.eye(size, 3, dtype=bool),  # clip k's frame k (for k < 3) unrepeated
    }
    labels = np.arange(size)
    weights = np.linspace(0.5, 2.0, size).astype(np.float32)
    mixed, targets, blended = mixed_batch(x, labels, weights, 0.4, size, np.random.default_rng(3))
    again = mixed_batch(x, labels, weights, 0.4, size, np.random.default_rng(3))
    np.testing.assert_array_equal(again[1], targets)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert targets.shape == (size, size) and targets.dtype == np.float32
    for k in range(size):
        share = targets[k, k]
        others = np.flatnonzero((targets[k] > 0) & (np.arange(size) != k))
        partner = int(others[0]) if len(others) else k  # lam = 1 or the clip with itself
        assert len(others) <= 1
        expected = share * (k + 1) + (1 - share) * (partner + 1)
        np.testing.assert_allclose(mixed["features"][k], expected, rtol=1e-5)
        np.testing.assert_array_equal(mixed["mask"][k], x["mask"][k] | x["mask"][partner])
        assert blended[k] == pytest.approx(share * weights[k] + (1 - share) * weights[partner])
    # frames (uint8) come back as float32 blends, the same shape
    frames = clips(size, t=2, size=4)
    out, _, none = mixed_batch(frames, labels, None, 0.4, size, np.random.default_rng(3))
    assert out.shape == frames.shape and out.dtype == np.float32 and none is None
    assert out.min() >= 0 and out.max() <= 255


def test_mixup_feeds_keras_blended_targets_with_blended_class_weights(tiny_params):
    """`train.mixup` routes the training split through the dataset even without jitter or
    oversampling: each batch is (clips, targets over the classes, weights), every clip of an
    epoch present, the stream the same for the same seed."""
    from pipeline.models.training_data import training_data

    x, y = clips(10), np.array([0] * 6 + [1] * 3 + [2])
    job = job_with(
        tiny_params, "cnn3d", batch_size=4, class_weights=True, oversample=False, mixup=0.4
    )
    fit = training_data(job, 0, x, y, 3)
    assert fit["steps_per_epoch"] == 3 and "y" not in fit and fit["class_weight"] is None
    xs, targets, weights = (np.concatenate(part) for part in zip(*fit["x"].epoch(0)))
    assert xs.shape == x.shape and targets.shape == (10, 3) and weights.shape == (10,)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    assert (targets.max(axis=1) < 1).any()  # some clips blended
    # each clip weighs its target's blend of the balanced class weights (n / (classes x count))
    balanced = 10 / (3 * np.array([6, 3, 1]))
    np.testing.assert_allclose(weights, targets @ balanced, rtol=1e-5)
    again = training_data(job, 0, x, y, 3)["x"].epoch(0)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in again]), targets)


@pytest.mark.slow  # builds ResNet101V2 and caches features twice: ~22 s; CI runs it
def test_cnn_gru_oversampling_uses_augmented_feature_cache(tmp_path, in_tmp_root, tiny_params):
    from pipeline.models.training_data import training_data
    from pipeline.stages.features import run as extract_features

    frames_dir = in_tmp_root / "data" / "frames"
    labels = {"train": np.array([0, 0, 0, 1]), "val": np.array([0, 1]), "test": np.array([1])}
    for split, y in labels.items():
        (frames_dir / split).mkdir(parents=True)
        save_arrays(
            frames_dir / split,
            frames=clips(len(y), t=4, size=32),
            labels=y,
            mask=np.ones((len(y), 4), bool),
        )
        pd.DataFrame({"path": [f"c{i}.avi" for i in range(len(y))]}).to_csv(
            frames_dir / split / "clips.csv", index=False
        )
    (frames_dir / "classes.json").write_text(json.dumps(["a", "b"]))
    params = {
        **tiny_params,
        "frames": {**tiny_params["frames"], "size": 32},
        "features": {**tiny_params["features"], "augmented_copies": 2, "batch_size": 4},
        "augment": AUG,
    }
    job, seed = job_with(params, "cnn_gru", oversample=True), params["seed"]

    no_copies = {**params, "features": {**params["features"], "augmented_copies": 0}}
    extract_features(parse_params(no_copies))
    x = {
        "features": np.load(in_tmp_root / "data/features/train/features.npy"),
        "mask": np.load(in_tmp_root / "data/features/train/mask.npy"),
    }
    with pytest.raises(PipelineError, match="features.augmented_copies"):
        training_data(job, seed, x, labels["train"], 2)

    extract_features(parse_params(params))
    train_dir = in_tmp_root / "data" / "features" / "train"
    aug = np.load(train_dir / "aug_features.npy")
    assert aug.shape == (4, 2, 4, x["features"].shape[-1])  # the copies' features as the clips'
    assert not (in_tmp_root / "data/features/val/aug_features.npy").exists()
    assert not np.allclose(aug[:, 0], x["features"])  # copies are features of altered frames
    fit = training_data(job, seed, x, labels["train"], 2)
    assert np.bincount(fit["y"]).tolist() == [3, 3]
    assert np.array_equal(fit["x"]["features"][:4], x["features"])
    assert fit["class_weight"] is None
    # with mixup the oversampled clips (originals and copies) are what is blended
    mixed = training_data(
        job_with(params, "cnn_gru", oversample=True, mixup=0.4), seed, x, labels["train"], 2
    )
    batches = mixed["x"].epoch(0)
    features = np.concatenate([b[0]["features"] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    assert features.shape == fit["x"]["features"].shape and targets.shape == (6, 2)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    originals = fit["x"]["features"]
    assert sum(not any(np.allclose(f, g) for g in originals) for f in features) >= 3  # blends


def test_motion_stream_features_are_the_features_of_frame_changes():
    """`features.motion`: each frame's own features, then the same backbone's features of its
    change since the previous frame (mid-grey = no change); frames of one clip only."""
    from pipeline.models.backbones import (
        build_backbone,
        frame_changes,
        frame_features,
        preprocess_for,
    )
    from pipeline.models.seeding import seed_everything

    frames = clips(3, t=4, size=32)
    changes = frame_changes(frames)
    assert changes.shape == frames.shape and np.all(changes[:, 0] == 127.5)
    np.testing.assert_allclose(
        changes[:, 1], (frames[:, 1] - frames[:, 0].astype(float)) / 2 + 127.5
    )
    seed_everything(0)
    backbone = build_backbone("resnet101v2", None, (32, 32, 3), "features.weights", pooling="avg")
    pre = preprocess_for("resnet101v2")
    both = frame_features(backbone, pre, frames, 5, desc="", motion=True)  # 5: passes span clips
    assert both.shape == (3, 4, 4096)
    np.testing.assert_allclose(
        both[..., :2048], frame_features(backbone, pre, frames, 5, desc=""), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        both[..., 2048:], frame_features(backbone, pre, changes, 5, desc=""), rtol=1e-4, atol=1e-5
    )
