"""Optical flow as a motion input (`frames.flow`, `-S inputs=flow`): measured between each
sampled frame and the next video frame, in frame sides per second; cached by the frames stage,
computed the same way for a served clip, turned with the frames by mirroring and augmentation,
and read by every model."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, augment_section, model_section

from pipeline.data.arrays import load_split, mirrored, save_arrays
from pipeline.data.augment import augment_clip, rotated_flow
from pipeline.data.flow import RGB_CHANNELS, FlowSettings, decode_speed, encode_speed
from pipeline.data.video import sample_frames
from pipeline.params import compose_params
from pipeline.schema import InvalidConfig, parse_params
from pipeline.serving.clips import clip_frames, window_frames

SIZE = 64  # frames.size of these tests: a 64 x 48 video letterboxed into 64 x 64, 8 rows of pad
FLOW_PARAMS = compose_params(
    # cnn_gru takes class weights: the augmented copies of its cached features have no flow
    ["experiment=tiny", "inputs=flow", "models.cnn_gru.train.oversample=false"],
    conf_dir=ROOT / "conf",
)
SETTINGS = FlowSettings.from_config(FLOW_PARAMS["frames"]["flow"])
PRE = {
    "frames": {"num_frames": 4, "size": SIZE, "pad_value": 0, "sampling": "uniform"},
    "min_frames": 1,
    "flow": FLOW_PARAMS["frames"]["flow"],
}


def write_moving_square(path, frames: int, fps: float, step_px: int, seed: int = 0) -> None:
    """A 64 x 48 MJPG clip: a textured 16 x 16 square moving `step_px` pixels to the right per
    video frame over a grey background."""
    texture = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    texture = cv2.resize(cv2.resize(texture, (4, 4)), (16, 16), interpolation=cv2.INTER_LINEAR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for i in range(frames):
        frame = np.full((48, 64, 3), 90, np.uint8)
        x = 4 + i * step_px
        frame[16:32, x : x + 16] = texture
        writer.write(frame)
    writer.release()


def square_speed(clip: np.ndarray) -> np.ndarray:
    """Mean flow (fractions of max_speed, x and y) over the pixels that move."""
    speed = decode_speed(clip[..., RGB_CHANNELS:])
    moving = np.abs(speed).sum(axis=-1) > 0.05
    assert moving.any(), "no motion measured"
    return speed[moving].mean(axis=0)


def test_flow_points_the_way_things_move_in_frame_sides_per_second(tmp_path):
    """A square moving right: positive x flow, no y flow; the same motion filmed at 10 fps
    (4 px per frame) and 20 fps (2 px per frame) measures the same speed; the RGB channels are
    the frames sampled without flow."""
    slow_film, fast_film = tmp_path / "at10fps.avi", tmp_path / "at20fps.avi"
    write_moving_square(slow_film, frames=10, fps=10, step_px=4)
    write_moving_square(fast_film, frames=20, fps=20, step_px=2)
    clip, mask = sample_frames(slow_film, 10, 4, SIZE, flow=SETTINGS, fps=10.0)
    rgb, rgb_mask = sample_frames(slow_film, 10, 4, SIZE)
    assert clip.shape == (4, SIZE, SIZE, 5) and clip.dtype == np.uint8
    np.testing.assert_array_equal(clip[..., :RGB_CHANNELS], rgb)
    np.testing.assert_array_equal(mask, rgb_mask)
    slow = square_speed(clip)
    fast = square_speed(sample_frames(fast_film, 20, 4, SIZE, flow=SETTINGS, fps=20.0)[0])
    # 4 px per frame at 10 fps = 40 px/s = 0.625 frame sides/s = 0.31 of max_speed 2.0
    expected = 4 * 10 / SIZE / SETTINGS.max_speed
    assert slow[0] == pytest.approx(expected, rel=0.35) and abs(slow[1]) < 0.05
    assert fast[0] == pytest.approx(slow[0], rel=0.25)


def test_served_clips_carry_the_flow_the_frames_stage_caches(tmp_path):
    """`predict` and the served model decode a clip with the flow the frames stage cached for
    it, byte for byte: as a whole clip and as the one window of a short recording."""
    video = tmp_path / "clip.avi"
    write_moving_square(video, frames=12, fps=15, step_px=3)
    cached, cached_mask = sample_frames(video, 12, 4, SIZE, flow=SETTINGS, fps=15.0)
    served, served_mask = clip_frames(video, PRE)
    np.testing.assert_array_equal(served, cached)
    np.testing.assert_array_equal(served_mask, cached_mask)
    (window, window_mask), *rest = window_frames(video, PRE, [(0, 12)])
    assert not rest
    np.testing.assert_array_equal(window, cached)
    np.testing.assert_array_equal(window_mask, cached_mask)
    # a model on frames alone gets frames alone
    plain, _ = clip_frames(video, {**PRE, "flow": None})
    np.testing.assert_array_equal(plain, cached[..., :RGB_CHANNELS])


def test_mirroring_and_augmentation_turn_the_flow_with_the_frames(tmp_path):
    """A mirror image of a clip moves the other way (test-time mirror averaging and the
    augmented copies of oversampling); a rotation turns the motion with the picture; blur and
    noise leave the flow alone."""
    video = tmp_path / "clip.avi"
    write_moving_square(video, frames=12, fps=15, step_px=3)
    clip, mask = sample_frames(video, 12, 4, SIZE, flow=SETTINGS, fps=15.0)
    original, mirror = mirrored(clip[None])
    np.testing.assert_array_equal(mirror[..., :RGB_CHANNELS], original[:, :, ::-1, :RGB_CHANNELS])
    assert square_speed(mirror)[0] == pytest.approx(-square_speed(original)[0], abs=1e-6)
    flipped, _ = augment_clip(clip, mask, augment_section(hflip=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(flipped, mirror)
    blurred = augment_section(blur=1.0, noise_std=10.0)
    noisy, _ = augment_clip(clip, mask, blurred, np.random.default_rng(0))
    np.testing.assert_array_equal(noisy[..., RGB_CHANNELS:], clip[..., RGB_CHANNELS:])
    assert not np.array_equal(noisy[..., :RGB_CHANNELS], clip[..., :RGB_CHANNELS])
    # a quarter turn: motion to the right becomes vertical, as fast
    quarter = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 90, 1.0)[:, :2]
    turned = decode_speed(rotated_flow(encode_speed(np.array([[0.5, 0.0]])), quarter))
    assert abs(turned[0, 0]) < 0.01 and abs(turned[0, 1]) == pytest.approx(0.5, abs=0.01)
    rotated, _ = augment_clip(
        clip, mask, augment_section(rotation_deg=30.0), np.random.default_rng(1)
    )
    assert rotated.shape == clip.shape


def test_models_on_flow_load_it_from_the_frames_cache(tmp_path, monkeypatch):
    """The frames stage's flow.npy reaches each model as `load_split` gives it: after the RGB
    channels for a frame model on `rgb_flow`, pooled over a 4 x 4 grid after the features of
    each frame for cnn_gru (`flow_grid: 4`: 32 more values per frame)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    video = tmp_path / "clip.avi"
    write_moving_square(video, frames=12, fps=15, step_px=3)
    clip, mask = sample_frames(video, 12, 4, SIZE, flow=SETTINGS, fps=15.0)
    frames_dir, features_dir = tmp_path / "data/frames/test", tmp_path / "data/features/test"
    for directory in (frames_dir, features_dir):
        directory.mkdir(parents=True)
        pd.DataFrame({"path": ["a/clip.avi"], "label": ["a"], "group": ["g"]}).to_csv(
            directory / "clips.csv", index=False
        )
    save_arrays(
        frames_dir, frames=clip[None, ..., :3], flow=clip[None, ..., 3:], labels=np.zeros(1)
    )
    features = np.random.default_rng(0).normal(size=(1, 4, 16)).astype(np.float32)
    save_arrays(features_dir, features=features, labels=np.zeros(1), mask=mask[None])
    config = parse_params(FLOW_PARAMS)
    inputs, _, _ = load_split(config.paths, config.models.cnn3d, "test")
    np.testing.assert_array_equal(inputs, clip[None])
    rgb_diff = config.models.cnn3d.model_copy(update={"motion": "rgb_diff"})
    plain, _, _ = load_split(config.paths, rgb_diff, "test")
    np.testing.assert_array_equal(plain, clip[None, ..., :3])
    sequence, _, _ = load_split(config.paths, config.models.cnn_gru, "test")
    assert sequence["features"].shape == (1, 4, 16 + 4 * 4 * 2)
    np.testing.assert_array_equal(sequence["features"][..., :16], features)
    assert np.abs(sequence["features"][..., 16:]).max() > 0.05  # the square's motion


def test_frame_models_on_frames_and_flow_build_save_and_load(tmp_path):
    """cnn3d on `rgb_flow` and frame_cnn on `flow` read 5 channels per frame, keep their
    predictions through save and load; in-model flips are refused for them, naming the key."""
    import keras

    from pipeline.models.builders import build_cnn3d, build_frame_cnn

    clips = np.random.default_rng(0).integers(1, 256, (2, 6, 80, 80, 5)).astype(np.float32)
    models = FLOW_PARAMS["models"]
    cnn3d = build_cnn3d(model_section("cnn3d", models["cnn3d"]), 6, 80, 3)
    frame_cnn = build_frame_cnn(
        model_section("frame_cnn", {**models["frame_cnn"], "motion": "flow"}), 6, 80, 3
    )
    for model in (cnn3d, frame_cnn):
        assert model.input_shape == (None, 6, 80, 80, 5)
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        np.testing.assert_allclose(
            keras.models.load_model(path).predict(clips, verbose=0),
            model.predict(clips, verbose=0),
            rtol=1e-5,
            atol=1e-6,
        )
    flipped = {**models["cnn3d"], "clip_augment": {"flip": True}}
    with pytest.raises(InvalidConfig, match=r"models\.cnn3d.*clip_augment.*optical flow"):
        parse_params({**FLOW_PARAMS, "models": {**models, "cnn3d": flipped}})


def test_cnn_gru_reads_the_pooled_flow_as_it_is_next_to_the_change_of_features():
    """With `feature_motion: diff` the GRU reads the change of the ResNet features from frame
    to frame, but the pooled flow after them is motion already and reaches it unchanged: two
    clips whose features are alike and whose (steady) flow differs are told apart."""
    from pipeline.models.builders import build_cnn_gru

    cfg = {
        **FLOW_PARAMS["models"]["cnn_gru"],
        "feature_motion": "diff",
        "normalize_features": False,
    }
    model = build_cnn_gru(model_section("cnn_gru", cfg), 4, 16 + 32, 3)
    looks = np.ones((2, 4, 16), np.float32)
    steady_flow = np.stack([np.full((4, 32), 0.0), np.full((4, 32), 0.8)]).astype(np.float32)
    features = np.concatenate([looks, steady_flow], axis=-1)
    probabilities = model.predict({"features": features, "mask": np.ones((2, 4), bool)}, verbose=0)
    assert not np.allclose(probabilities[0], probabilities[1], atol=1e-4)


@pytest.mark.slow  # its own tiny `dvc repro` with optical flow (~2 min) and four `predict` runs
def test_pipeline_on_flow_serves_what_it_evaluated(tmp_path):
    """`-S inputs=flow` end to end: the frames stage caches each clip's flow, every model
    trains on it, and `predict`, which decodes each test video and measures its flow again,
    gives every test clip the label and probability the evaluation gave it, for each model
    and for the ensemble of them."""

    from conftest import MODELS, assert_predict_reproduces_the_evaluation, project_copy, run

    repo = tmp_path / "project"
    repo.mkdir()
    # cnn3d oversamples (augmented copies of clips with their flow); cnn_gru has no flow for
    # the augmented copies of its cached features, so it takes class weights
    env = project_copy(repo, ["inputs=flow", "models.cnn_gru.train.oversample=false"])
    run(["dvc", "repro"], repo, env)
    frames = np.load(repo / "data/frames/test/frames.npy")
    flow = np.load(repo / "data/frames/test/flow.npy")
    assert flow.shape == (*frames.shape[:-1], 2) and flow.dtype == np.uint8
    assert_predict_reproduces_the_evaluation(repo, env, [*MODELS, "ensemble"])
