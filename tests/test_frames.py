"""Frame sampling spreads over the whole clip, decodes real video, letterboxes with padding."""

import numpy as np
import pytest

from pipeline.frames import letterbox, sample_frames, sample_indices

from conftest import write_numbered_video


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
    assert out[0].max() == 0 and out[-1].max() == 0          # padded rows top and bottom
    assert out[32].min() == 200                               # content row spans the width


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
    from pipeline.clean import probe_clip

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    src = tmp_path / "src.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(10):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :32] = 200  # stored: bright left half
        writer.write(frame)
    writer.release()
    plain, rotated = tmp_path / "plain.mp4", tmp_path / "rotated.mp4"
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-i", str(src), "-c:v", "mpeg4",
                    str(plain)], check=True)
    subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-display_rotation", "90", "-i",
                    str(plain), "-c", "copy", str(rotated)], check=True)

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
