"""Inference preprocessing without a model: windows over long recordings and request input."""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
from conftest import write_numbered_video

from pipeline.data.video import sample_frames
from pipeline.serving.clips import (
    VideoError,
    clip_frames,
    video_paths,
    window_bounds,
    window_frames,
)
from pipeline.serving.pyfunc import request_videos

PRE = {"frames": {"num_frames": 4, "size": 32, "pad_value": 0, "sampling": "uniform"}}


def grey_levels(frames: np.ndarray) -> list[int]:
    """The frame numbers a numbered video's frames show (grey level 10 * i, centre pixel)."""
    return [round(int(f[16, 16, 0]) / 10) for f in frames]


def test_windows_cover_the_whole_recording():
    assert window_bounds(100, 10.0, 2.0, 1.0)[:3] == [(0, 20), (10, 30), (20, 40)]
    bounds = window_bounds(105, 10.0, 2.0, 1.0)
    assert bounds[-1] == (85, 105)  # the last window is aligned to the end
    assert window_bounds(15, 10.0, 2.0, 1.0) == [(0, 15)]  # shorter than one window
    with pytest.raises(ValueError, match="positive"):
        window_bounds(100, 10.0, 0, 1.0)
    with pytest.raises(VideoError, match="frame rate"):
        window_bounds(100, 0.0, 2.0, 1.0)


def test_windows_sample_their_own_span_in_one_pass(tmp_path):
    video = tmp_path / "long.avi"
    write_numbered_video(video, 24, fps=4.0)
    bounds = window_bounds(24, 4.0, 2.0, 1.0)  # 8-frame windows every 4 frames
    windows = list(window_frames(video, PRE, bounds))
    assert len(windows) == len(bounds) == 5
    for (start, _end), (frames, mask) in zip(bounds, windows):
        # uniform sampling inside the window, exactly as a cut clip of that span is sampled
        assert grey_levels(frames) == [start + 1, start + 3, start + 5, start + 7]
        assert mask.all() and frames.shape == (4, 32, 32, 3)


def test_a_clip_is_sampled_as_the_frames_stage_samples_it(tmp_path):
    video = tmp_path / "clip.avi"
    write_numbered_video(video, 10)
    frames, mask = clip_frames(video, PRE)
    expected, expected_mask = sample_frames(video, 10, 4, 32, 0, "uniform")
    assert np.array_equal(frames, expected) and np.array_equal(mask, expected_mask)


def test_unreadable_files_raise_a_video_error(tmp_path):
    text = tmp_path / "notes.avi"
    text.write_text("not a video")
    with pytest.raises(VideoError, match="notes.avi"):
        clip_frames(text, PRE)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        clip_frames(tmp_path / "empty.mp4", PRE)


def test_video_paths_finds_videos_in_folders(tmp_path):
    (tmp_path / "a").mkdir()
    write_numbered_video(tmp_path / "a" / "x.avi", 3)
    (tmp_path / "a" / "notes.txt").write_text("-")
    assert video_paths(tmp_path) == [tmp_path / "a" / "x.avi"]
    with pytest.raises(FileNotFoundError):
        video_paths(tmp_path / "missing")


def test_request_rows_base64_or_path_with_clear_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv("HANDBALL_SERVE_PATH_ROOT", raising=False)
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    clip = allowed / "clip.avi"
    write_numbered_video(clip, 5)
    secret = outside / "secret.avi"
    write_numbered_video(secret, 5)
    encoded = base64.b64encode(clip.read_bytes()).decode()
    [(row, path, temporary)] = list(request_videos(pd.DataFrame({"video": [encoded]})))
    assert row == 0 and temporary and path.read_bytes() == clip.read_bytes()
    path.unlink()

    def refused(frame: pd.DataFrame, match: str) -> str:
        with pytest.raises(VideoError, match=match) as err:
            list(request_videos(frame))
        return str(err.value)

    refused(pd.DataFrame({"clip": [encoded]}), "needs a `video` field")
    refused(pd.DataFrame({"video": ["***"]}), "not valid base64")
    refused(pd.DataFrame({"video": [""]}), "both missing or empty")
    # reading files by path is off unless a root is named, and then only under it
    refused(pd.DataFrame({"path": [str(clip)]}), "does not read files by `path`")
    monkeypatch.setenv("HANDBALL_SERVE_PATH_ROOT", str(allowed))
    assert list(request_videos(pd.DataFrame({"path": [str(clip)]}))) == [(0, clip, False)]
    # outside the root, through `..`, through a link, or missing: one answer for all
    (allowed / "link.avi").symlink_to(secret)
    answers = {
        refused(pd.DataFrame({"path": [p]}), "not a readable file under")
        for p in (
            str(secret),
            str(allowed / ".." / "outside" / "secret.avi"),
            str(allowed / "link.avi"),
            str(allowed / "nope.avi"),
        )
    }
    assert len(answers) == 1
    monkeypatch.setenv("HANDBALL_MAX_VIDEO_MB", "0.001")
    refused(pd.DataFrame({"video": [encoded]}), "over the 0.001 MB limit")
    refused(pd.DataFrame({"path": [str(clip)]}), "over the 0.001 MB limit")
    monkeypatch.setenv("HANDBALL_MAX_ROWS", "2")
    refused(pd.DataFrame({"video": [encoded] * 3}), "3 rows: a request holds at most 2")


def test_a_request_decodes_at_most_its_frame_budget(tmp_path):
    """Decoding stops once the request's frame budget is spent; the clip is refused."""
    from pipeline.serving.clips import FrameBudget, OverFrameBudget

    video = tmp_path / "clip.avi"
    write_numbered_video(video, 12)
    budget = FrameBudget(30)
    clip_frames(video, PRE, budget)
    assert budget.remaining == 18
    clip_frames(video, PRE, budget)
    with pytest.raises(OverFrameBudget, match="more than 30 frames"):
        clip_frames(video, PRE, budget)  # 12 more than the 6 left


def test_models_logged_before_the_layered_package_find_their_class():
    """A model logged before pipeline/ was split into layers pickled its python model as
    `pipeline.inference.VideoClassifierModel`; unpickling that name (protocol 0, as written
    by hand here) gives today's class, which reads the same model format."""
    import pickle

    from pipeline.serving.pyfunc import VideoClassifierModel

    assert pickle.loads(b"cpipeline.inference\nVideoClassifierModel\n.") is VideoClassifierModel


def test_predict_json_has_every_class_probability_and_csv_the_top_k():
    import json

    import numpy as np

    from pipeline.serving.predict import class_probabilities, ranked_columns, render, top_k

    classes = ["passing", "shot", "defence"]
    probs = np.array([0.2, 0.7, 0.1])
    row = {"path": "a.avi", **ranked_columns(top_k(classes, probs, 2))}
    row["probabilities"] = class_probabilities(classes, probs)
    parsed = json.loads(render([row], "json"))[0]
    assert parsed["probabilities"] == {"passing": 0.2, "shot": 0.7, "defence": 0.1}
    assert (parsed["action_1"], parsed["action_2"]) == ("shot", "passing")
    header = render([row], "csv").splitlines()[0]
    assert header == "path,action_1,probability_1,action_2,probability_2"
    assert "probabilities" not in render([row], "table")
