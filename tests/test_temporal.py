"""Frames in time: temporal jitter (each training epoch draws each clip's frames afresh from
its cached ones) and test-time averaging over interleaved views of them (`tta_views`), in
training, evaluation and serving."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import augment_section

from pipeline.data.arrays import evaluation_views, select_frames
from pipeline.data.temporal import jittered_indices, view_count, view_indices
from pipeline.models.training_data import training_clips

CACHED, READ = 16, 8


def numbered_cache(clips: int, frames: int = CACHED, size: int = 4) -> np.ndarray:
    """Clips whose every pixel holds its frame's index plus 20 x the clip's."""
    values = np.arange(frames)[None, :] + 20 * np.arange(clips)[:, None]
    return np.broadcast_to(values[..., None, None, None], (clips, frames, size, size, 3)).astype(
        np.uint8
    )


def test_views_take_every_cached_frame_once_and_jitter_stays_in_each_segment():
    views = view_indices(CACHED, READ)
    np.testing.assert_array_equal(views, [np.arange(0, 16, 2), np.arange(1, 16, 2)])
    assert sorted(view_indices(12, 4).ravel()) == list(range(12))  # 3 views of 4
    assert view_count(8, 8) == view_count(8, None) == 1
    np.testing.assert_array_equal(view_indices(8, None), [np.arange(8)])
    picks = jittered_indices(CACHED, READ, 50, np.random.default_rng(0))
    assert picks.shape == (50, READ)
    np.testing.assert_array_equal(picks // 2, np.broadcast_to(np.arange(READ), picks.shape))
    assert len({tuple(p) for p in picks}) > 40  # clips get different frames
    again = jittered_indices(CACHED, READ, 50, np.random.default_rng(0))
    np.testing.assert_array_equal(picks, again)
    with pytest.raises(ValueError, match="num_frames=20 but the cache holds 16 frames"):
        view_indices(CACHED, 20)


def test_training_clips_draw_each_clips_frames_afresh_every_epoch():
    """The jittered training dataset: every batch holds the clips' own frames, one from each
    segment, with their labels and class weights; a new epoch draws new frames; the same
    seed the same batches; oversampled copies are drawn from the cache too."""
    cache, labels = numbered_cache(6), np.array([0, 0, 0, 0, 1, 1])
    fixed = select_frames(cache, view_indices(CACHED, READ)[0])

    data = training_clips(
        fixed, labels, 4, seed=3, class_weight={0: 0.75, 1: 1.5}, cache=cache, num_frames=READ
    )
    first = data.epoch(0)
    for x, y, w in first:
        clip = x[:, 0, 0, 0, 0] // 20
        frame = x[:, :, 0, 0, 0] % 20
        assert x.shape[1:] == (READ, 4, 4, 3)
        np.testing.assert_array_equal(y, labels[clip])
        np.testing.assert_array_equal(w, np.where(y == 0, 0.75, 1.5))
        np.testing.assert_array_equal(frame // 2, np.broadcast_to(np.arange(READ), frame.shape))
    seen = sorted(int(c) for x, _, _ in first for c in x[:, 0, 0, 0, 0] // 20)
    assert seen == list(range(6))  # every clip once an epoch
    second = data.epoch(1)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    replay = training_clips(
        fixed, labels, 4, seed=3, class_weight={0: 0.75, 1: 1.5}, cache=cache, num_frames=READ
    ).epoch(0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, replay))
    oversampled = training_clips(
        fixed, labels, 4, seed=3, augment=augment_section(), cache=cache, num_frames=READ
    )
    batches = oversampled.epoch(0)
    assert sum(len(y) for _, y in batches) == 8  # class 1 topped up to 4 clips
    for x, _ in batches:
        np.testing.assert_array_equal(
            x[:, :, 0, 0, 0] % 20 // 2, np.broadcast_to(np.arange(READ), x.shape[:2])
        )


def test_sequence_features_are_jittered_and_viewed_with_their_masks():
    """cnn_gru's cached features: a view or a jittered pick keeps each frame's own features,
    with repeats of a short clip masked out and the valid frames first."""
    feats = np.arange(2 * CACHED, dtype=np.float32).reshape(2, CACHED, 1)
    mask = np.ones((2, CACHED), bool)
    mask[1, 4:] = False  # the second clip had 4 distinct frames, repeated
    views = evaluation_views({"features": feats, "mask": mask}, READ, views=True)
    assert len(views) == 2
    np.testing.assert_array_equal(views[1]["features"][0, :, 0], np.arange(1, 16, 2))
    # frames 0, 2 and 4 (a repeat of 3, which this view skips) are distinct; the rest repeat
    assert views[0]["mask"][1].tolist() == [True] * 3 + [False] * 5
    data = training_clips(
        views[0],
        np.array([0, 1]),
        2,
        seed=0,
        cache={"features": feats, "mask": mask},
        num_frames=READ,
    )
    x, y = data[0]
    assert set(x) == {"features", "mask"} and x["features"].shape == (2, READ, 1)
    for row, label in zip(range(2), y):
        valid = x["features"][row, x["mask"][row], 0]
        assert (valid // CACHED == label).all() and (np.diff(valid) > 0).all()


def test_a_model_fits_on_jittered_clips_and_is_evaluated_on_every_view():
    """Keras trains on the jittered dataset (with class weights as sample weights); the
    evaluation's probabilities are the mean over the views' predictions."""
    import keras

    from pipeline.models.evaluation import clip_probabilities

    keras.utils.set_random_seed(0)
    cache, labels = numbered_cache(6), np.array([0, 1, 0, 1, 0, 1])
    model = keras.Sequential(
        [
            keras.Input((READ, 4, 4, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    views = evaluation_views(cache, READ, views=True)
    data = training_clips(
        views[0], labels, 4, seed=0, class_weight={0: 1.0, 1: 1.0}, cache=cache, num_frames=READ
    )
    history = model.fit(
        data, epochs=2, steps_per_epoch=data.batches_per_epoch, shuffle=False, verbose=0
    )
    assert len(history.history["loss"]) == 2
    expected = np.mean([model.predict(v, verbose=0) for v in views], axis=0)
    np.testing.assert_allclose(clip_probabilities(model, views, 4), expected, atol=1e-6)
    assert not np.allclose(model.predict(views[0], verbose=0), expected, atol=1e-6)


def test_served_model_averages_over_the_views_it_was_evaluated_on(tmp_path, monkeypatch):
    """A logged model with `tta_views` classifies a decoded clip as the mean over its views;
    `predict --views` turns it on for a model that reads fewer frames than are sampled and
    declines for one that reads them all."""
    import keras
    from conftest import write_numbered_video

    from pipeline.serving.classifier import VideoClassifier
    from pipeline.serving.clips import clip_frames

    monkeypatch.setenv("HANDBALL_INFERENCE_RUNTIME", "keras")
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((4, 32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv3D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling3D(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    pre = {
        "model": "cnn3d",
        "classes": ["a", "b", "c"],
        "input": "frames",
        "frames": {"num_frames": 8, "size": 32, "pad_value": 0, "sampling": "uniform"},
        "model_frames": 4,
        "batch_size": 4,
        "min_frames": 4,
    }
    video = tmp_path / "clip.avi"
    write_numbered_video(video, 16)
    frames, masks = clip_frames(video, pre)
    batch = frames[None]
    expected = np.mean(
        [np.asarray(model.predict_on_batch(batch[:, idx])) for idx in view_indices(8, 4)], axis=0
    )
    averaged = VideoClassifier(model, {**pre, "tta_views": True})
    np.testing.assert_allclose(averaged.probabilities(batch, masks[None]), expected, atol=1e-6)
    plain = VideoClassifier(model, dict(pre))
    assert not np.allclose(plain.probabilities(batch, masks[None]), expected, atol=1e-6)
    assert plain.use_view_averaging() and plain.pre["tta_views"]
    every_frame = VideoClassifier(model, {**pre, "model_frames": None})
    assert not every_frame.use_view_averaging()


@pytest.mark.slow  # its own tiny `dvc repro` of two models (~2 min) and two `predict` runs
def test_a_model_evaluated_over_views_is_validated_on_every_view_while_it_trains(
    tmp_path, tiny_params
):
    """What `fit` validates each epoch on (and so which epoch is kept): with `tta_views`,
    every validation clip once per view, the frames it is scored on, its label repeated;
    without, its fixed evenly spaced frames once. Scores keep one label per clip."""
    import pandas as pd

    from pipeline.schema import parse_params
    from pipeline.stages.train import load_data

    for split, clips in (("train", 4), ("val", 3), ("test", 2)):
        directory = tmp_path / "frames" / split
        directory.mkdir(parents=True)
        np.save(directory / "frames.npy", numbered_cache(clips))
        np.save(directory / "labels.npy", np.arange(clips) % 2)
        pd.DataFrame({"clip": [f"{split}{i}" for i in range(clips)]}).to_csv(
            directory / "clips.csv", index=False
        )
    params = {
        **tiny_params,
        "paths": {**tiny_params["paths"], "frames": str(tmp_path / "frames")},
        "frames": {**tiny_params["frames"], "num_frames": CACHED},
    }
    for views, expected_frames in ((True, view_indices(CACHED, READ)), (False, None)):
        cnn3d = {**tiny_params["models"]["cnn3d"], "num_frames": READ, "tta_views": views}
        config = parse_params({**params, "models": {**params["models"], "cnn3d": cnn3d}})
        data, clips = load_data(config.paths, config.models.cnn3d)
        x_val, y_val = data["val"]
        clip, frame = x_val[:, 0, 0, 0, 0] // 20, x_val[:, :, 0, 0, 0] % 20
        if views:
            np.testing.assert_array_equal(clip, [0, 1, 2, 0, 1, 2])
            np.testing.assert_array_equal(frame, np.repeat(expected_frames, 3, axis=0))
        else:
            np.testing.assert_array_equal(clip, [0, 1, 2])
            np.testing.assert_array_equal(frame[0], [0, 2, 4, 6, 9, 11, 13, 15])  # evenly spaced
        np.testing.assert_array_equal(y_val, clip % 2)
        np.testing.assert_array_equal(data["labels"]["val"], [0, 1, 0])
        assert len(data["views"]["val"]) == (2 if views else 1) and len(clips["val"]) == 3


def test_pipeline_with_temporal_jitter_serves_what_it_evaluated(tmp_path):
    """Twice the frames cached as cnn3d and cnn_gru read: both train with temporal jitter
    (cnn3d with oversampled copies as well) and are evaluated over the two views; `predict`
    on the test videos gives every clip the label and probability the evaluation gave it."""

    from conftest import assert_predict_reproduces_the_evaluation, project_copy, run

    repo = tmp_path / "project"
    repo.mkdir()
    settings = ["num_frames=6", "train.temporal_jitter=true", "tta_views=true"]
    env = project_copy(
        repo,
        [
            "frames.num_frames=12",
            "models.cnn_gru.train.oversample=false",
            *[f"models.{m}.{s}" for m in ("cnn3d", "cnn_gru") for s in settings],
        ],
    )
    run(["dvc", "repro", "train@cnn3d", "train@cnn_gru"], repo, env)
    assert np.load(repo / "data/frames/test/frames.npy", mmap_mode="r").shape[1] == 12
    assert_predict_reproduces_the_evaluation(repo, env, ["cnn3d", "cnn_gru"])


def test_keras_trains_on_each_epochs_own_batches_in_order():
    """What Keras' fit feeds the model, epoch after epoch, is exactly `data.epoch(k)` for
    k = 0, 1, 2. Keras' input pipeline fetches the next epoch's first batches before the
    epoch ends: a dataset that changed at `on_epoch_end` (as this one did) fed those batches
    from the previous epoch's draw, a different number of them from run to run."""
    import keras

    seen = []

    class Recorder(keras.layers.Layer):
        def call(self, x, training=False):
            if training:
                seen.append(keras.ops.convert_to_numpy(x))
            return x

    cache, labels = numbered_cache(6), np.array([0, 1, 0, 1, 0, 1])
    data = training_clips(
        evaluation_views(cache, READ, views=True)[0],
        labels,
        4,
        seed=0,
        class_weight={0: 1.0, 1: 2.0},
        cache=cache,
        num_frames=READ,
    )
    model = keras.Sequential(
        [
            keras.Input((READ, 4, 4, 3)),
            Recorder(),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(
        optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True
    )  # records
    model.fit(data, epochs=3, steps_per_epoch=data.batches_per_epoch, shuffle=False, verbose=0)
    expected = [x for epoch in range(3) for x, _, _ in data.epoch(epoch)]
    assert len(seen) == len(expected) == 3 * 2
    for fed, batch in zip(seen, expected):
        np.testing.assert_array_equal(fed, batch)
