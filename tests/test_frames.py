"""Frame sampling spreads over the whole clip, decodes real video, letterboxes with padding."""

import numpy as np
import pytest
from conftest import write_numbered_video

from pipeline.data.video import letterbox, sample_frames, sample_indices


def test_indices_spread_over_whole_clip_not_first_n():
    idx = sample_indices(100, 8)
    assert len(idx) == 8 and np.all(np.diff(idx) > 0)
    assert idx[0] < 100 / 8 and idx[-1] >= 100 - 100 / 8  # first and last segment covered
    assert not np.array_equal(idx, np.arange(8))


def test_short_clip_repeats_frames_inside_the_clip():
    idx = sample_indices(3, 8)
    assert idx.min() >= 0 and idx.max() == 2 and len(idx) == 8
    assert set(idx.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("total,n", [(0, 4), (5, 0)])
def test_impossible_sampling_raises(total, n):
    with pytest.raises(ValueError):
        sample_indices(total, n)


def test_letterbox_keeps_aspect_and_pads():
    frame = np.full((50, 100, 3), 200, np.uint8)
    out = letterbox(frame, 64, pad_value=0)
    assert out.shape == (64, 64, 3)
    assert out[0].max() == 0 and out[-1].max() == 0  # padded rows top and bottom
    assert out[32].min() == 200  # content row spans the width


def test_sample_frames_decodes_the_sampled_frames(tmp_path):
    path = tmp_path / "clip.avi"
    write_numbered_video(path, 20)
    frames, mask = sample_frames(path, total=20, n=4, size=32)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    # frame i has grey level 10*i; MJPG is lossy, so compare to within a few levels
    levels = frames[:, 16, 16, 0].astype(int)
    np.testing.assert_allclose(levels, 10 * sample_indices(20, 4), atol=4)
    assert mask.all()


def test_sample_frames_masks_repeated_frames_of_short_clip(tmp_path):
    path = tmp_path / "short.avi"
    write_numbered_video(path, 3)
    frames, mask = sample_frames(path, total=3, n=6, size=16)
    assert frames.shape[0] == 6
    assert mask.tolist() == [True, False, True, False, True, False]


def test_clip_shorter_than_probed_is_resampled_over_what_decodes(tmp_path, caplog):
    path = tmp_path / "clip.avi"
    write_numbered_video(path, 5)
    frames, mask = sample_frames(path, total=50, n=4, size=16)  # probe claimed 50 frames
    assert "only 5 of 50" in caplog.text
    levels = frames[:, 12, 12, 0].astype(int)
    np.testing.assert_allclose(levels, 10 * sample_indices(5, 4), atol=4)


def test_undecodable_file_raises_naming_it(tmp_path):
    path = tmp_path / "fake.avi"
    path.write_text("not a video\n" * 50)
    with pytest.raises(IOError, match="fake.avi"):
        sample_frames(path, total=10, n=4, size=16)


def test_sampling_strategies():
    assert sample_indices(100, 4, "start").tolist() == [0, 1, 2, 3]
    assert sample_indices(100, 4, "center").tolist() == [48, 49, 50, 51]
    assert sample_indices(3, 5, "center").tolist() == [0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="frames.sampling"):
        sample_indices(10, 4, "random")


def test_rotation_metadata_is_applied(tmp_path):
    """A phone-style clip stored landscape with a 90-degree display rotation comes out
    portrait in the probe and in the sampled frames. OpenCV cannot write rotation metadata,
    so the clip is made with the ffmpeg binary from imageio-ffmpeg (stream copy, no re-encode
    of the rotation)."""
    import subprocess

    import cv2

    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    from pipeline.data.video import probe_clip

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    src = tmp_path / "src.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(10):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :32] = 200  # stored: bright left half
        writer.write(frame)
    writer.release()
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    subprocess.run(
        [ffmpeg, "-y", "-loglevel", "error", "-i", str(src), "-c:v", "mpeg4", str(plain)],
        check=True,
    )
    subprocess.run(
        [
            ffmpeg,
            "-y",
            "-loglevel",
            "error",
            "-display_rotation",
            "90",
            "-i",
            str(plain),
            "-c",
            "copy",
            str(rotated),
        ],
        check=True,
    )

    assert (probe_clip(plain)["width"], probe_clip(plain)["height"]) == (64, 48)
    info = probe_clip(rotated)
    assert (info["width"], info["height"]) == (48, 64) and info["frames"] == 10
    frames, _ = sample_frames(rotated, total=10, n=2, size=64)
    # portrait 48x64 letterboxed into 64x64: padding left and right, the bright half now at
    # the top or bottom rather than the left
    first = frames[0, :, :, 0].astype(int)
    assert first[:, :6].max() < 10 and first[:, -6:].max() < 10
    top, bottom = first[:28, 12:52].mean(), first[36:, 12:52].mean()
    assert abs(top - bottom) > 150


def is_right_padded(mask: np.ndarray) -> bool:
    """cuDNN's condition: every row is some True steps followed only by False steps."""
    return bool(all(not np.any(row[np.argmin(row) :]) if not row.all() else True for row in mask))


def test_right_align_moves_repeats_behind_the_valid_frames_in_order():
    from pipeline.data.arrays import right_align
    from pipeline.data.video import repeat_mask

    # a 3-frame clip sampled 8 times ([0 0 0 1 1 2 2 2]) and a long clip (no repeats)
    short = repeat_mask(sample_indices(3, 8))
    assert not is_right_padded(short[None])  # repeats sit in the middle
    mask = np.stack([short, np.ones(8, bool)])
    values = np.arange(16, dtype=np.float32).reshape(2, 8) * 10  # value = 10 x position
    values = np.stack([values, -values], axis=-1)  # 2 x 8 x 2 (a feature axis)
    aligned, aligned_mask = right_align(values, mask)
    assert is_right_padded(aligned_mask)
    np.testing.assert_array_equal(aligned_mask[0], [1, 1, 1, 0, 0, 0, 0, 0])
    # the valid frames keep their order; padding repeats the last valid frame
    np.testing.assert_array_equal(aligned[0, :, 0], [0, 30, 50, 50, 50, 50, 50, 50])
    np.testing.assert_array_equal(aligned[0, :, 1], -aligned[0, :, 0])
    np.testing.assert_array_equal(aligned[1], values[1])  # nothing to move
    np.testing.assert_array_equal(aligned_mask[1], mask[1])


def test_right_align_refuses_a_clip_without_valid_frames():
    from pipeline.data.arrays import right_align

    with pytest.raises(ValueError, match="no valid frame"):
        right_align(np.zeros((1, 4, 3)), np.zeros((1, 4), bool))


def test_sequence_model_inputs_are_right_padded_after_a_frame_subset():
    """What cnn_gru gets in training and in serving (`train.sequence_inputs`): the cache's
    repeat masks (repeats inside the clip) turned into right-padded ones."""
    from pipeline.data.arrays import sequence_inputs
    from pipeline.data.video import repeat_mask

    masks = np.stack([repeat_mask(sample_indices(total, 8)) for total in (2, 5, 8, 30)])
    feats = np.random.default_rng(0).normal(size=(4, 8, 3)).astype(np.float32)
    for n in (None, 4):
        inputs = sequence_inputs(feats, masks, n)
        assert inputs["features"].shape == (4, n or 8, 3)
        assert is_right_padded(inputs["mask"])
    assert inputs["mask"].sum(axis=1).tolist() == [2, 4, 4, 4]
