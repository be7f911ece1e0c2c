"""Videos as a model sees them: counted by decoding, frames sampled over a clip (or over each
window of a long recording) and letterboxed as the frames stage did; clear errors for files
that are not readable videos."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov", ".mkv", ".mpg", ".mpeg", ".m4v", ".webm", ".wmv")

# What a served model accepts per request (environment variables of the serving process).
MAX_VIDEO_MB_ENV = "HANDBALL_MAX_VIDEO_MB"  # size of each video
DEFAULT_MAX_VIDEO_MB = 200.0
MAX_ROWS_ENV = "HANDBALL_MAX_ROWS"  # videos per request
DEFAULT_MAX_ROWS = 32
MAX_FRAMES_ENV = "HANDBALL_MAX_FRAMES"  # frames decoded per request, all its videos together
DEFAULT_MAX_FRAMES = 20_000
# A folder whose files requests may name by `path`; unset (the default), `path` is refused.
PATH_ROOT_ENV = "HANDBALL_SERVE_PATH_ROOT"


class VideoError(PipelineError):
    """One input video cannot be classified (unreadable, empty, too large...)."""


class OverFrameBudget(VideoError):
    """A request would decode more frames than it may."""


class TooFewFrames(VideoError):
    """A video has fewer decodable frames than the model was trained to accept."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def min_frames(pre: dict) -> int:
    """The fewest decodable frames the model accepts: the clean stage's `min_frames` it was
    trained with (models logged before it was recorded: any decodable frame)."""
    return int(pre.get("min_frames") or 1)


def too_few_frames(found: int, pre: dict, what: str = "decodable frames") -> str:
    """Why a clip (or window) of `found` frames is refused, or "" when it has enough."""
    needed = min_frames(pre)
    if found >= needed:
        return ""
    return (
        f"{found} {what}, the model needs at least {needed} (clean.min_frames it was trained "
        f"with: shorter clips were left out of its training and evaluation)"
    )


class FrameBudget:
    """Frames a request may still decode; `take` refuses a video that would go over."""

    def __init__(self, frames: int):
        self.remaining = int(frames)
        self.limit = int(frames)

    def take(self, decoded: int) -> None:
        if decoded > self.remaining:
            raise OverFrameBudget(
                f"the request decodes more than {self.limit} frames ({MAX_FRAMES_ENV})"
            )
        self.remaining -= decoded


def window_bounds(
    total: int, fps: float, window_s: float, stride_s: float
) -> list[tuple[int, int]]:
    """[start, end) frame ranges of `window_s`-second windows every `stride_s` seconds.

    The last window is aligned to the end of the video, so every frame is covered; a video
    shorter than one window is one window.
    """
    if window_s <= 0 or stride_s <= 0:
        raise ValueError(f"--window ({window_s}) and --stride ({stride_s}) must be positive")
    if fps <= 0:
        raise VideoError("the video reports no frame rate; windows in seconds need one")
    length = max(1, round(window_s * fps))
    stride = max(1, round(stride_s * fps))
    if total <= length:
        return [(0, total)]
    bounds = [(s, s + length) for s in range(0, total - length + 1, stride)]
    if bounds[-1][1] < total:
        bounds.append((total - length, total))
    return bounds


def window_frames(
    path: Path, pre: dict, bounds: list[tuple[int, int]]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each window's sampled frames (with their optical flow where the model reads it) and
    mask, decoding the video once front to back.

    Frames are kept only until the last window that needs them has been yielded, so memory
    holds the frames of the windows that overlap, not the whole recording.
    """

    from pipeline.data.flow import FlowSettings
    from pipeline.data.video import (
        display_frame,
        flow_without_frame_rate,
        frame_rate,
        frames_needed,
        open_video,
        repeat_mask,
        sample_indices,
        sampled_clip,
    )

    cfg = pre["frames"]
    n, size, pad = int(cfg["num_frames"]), int(cfg["size"]), int(cfg["pad_value"])
    flow = FlowSettings.from_config(pre.get("flow"))
    # per window: its sampled frames and what they need decoded, as offsets into the window
    plans = [
        (start, end - start, sample_indices(end - start, n, cfg["sampling"]))
        for start, end in bounds
    ]
    needs = [start + frames_needed(idx, length, flow) for start, length, idx in plans]
    last_use: dict[int, int] = {}
    for w, needed in enumerate(needs):
        for i in needed.tolist():
            last_use[i] = w
    kept: dict[int, np.ndarray] = {}
    cap = open_video(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it")
    fps = frame_rate(cap)
    if reason := flow_without_frame_rate(path, flow, fps):
        raise VideoError(reason)
    try:
        frame_no, next_window = 0, 0
        while next_window < len(plans) and cap.grab():
            if frame_no in last_use:
                ok, frame = cap.retrieve()
                if not ok:
                    raise VideoError(f"{path}: frame {frame_no} does not decode")
                kept[frame_no] = display_frame(frame, size, pad)
            while next_window < len(plans) and int(needs[next_window].max()) <= frame_no:
                start, length, idx = plans[next_window]
                window = {i - start: kept[i] for i in needs[next_window].tolist()}
                yield sampled_clip(window, idx, length, flow, fps), repeat_mask(idx)
                for i in needs[next_window].tolist():
                    if last_use[i] == next_window:
                        del kept[i]
                next_window += 1
            frame_no += 1
    finally:
        cap.release()
    if next_window < len(plans):
        raise VideoError(f"{path}: stopped decoding at frame {frame_no}, before the end counted")


def count_frames(path: Path) -> tuple[int, float]:
    """(decodable frames, fps) of a video, counted by decoding as the clean stage does."""
    from pipeline.data.video import probe_clip

    info = probe_clip(path)
    if info["error"]:
        raise VideoError(f"{path}: {info['error']}")
    return info["frames"], info["fps"]


def clip_frames(
    path: Path, pre: dict, budget: FrameBudget | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(N x S x S x 3 uint8, N mask) of one clip: the frames the frames stage would cache
    (N x S x S x 5 with their cached optical flow where the model reads it, `pre["flow"]`).

    The clean stage counts a clip's frames by decoding all of them and the frames stage then
    samples on that count. Here this takes one pass when the container's frame count is right
    (the usual case): the frames at the positions sampled for that count are kept while every
    frame is counted. If the count turns out to differ, the positions are redrawn on the true
    count and the clip decoded again, so the result is always the stage's. With a `budget`,
    decoding stops once it is spent and the clip is refused.
    """
    import cv2

    from pipeline.data.flow import FlowSettings
    from pipeline.data.video import (
        flow_without_frame_rate,
        frame_rate,
        frames_needed,
        open_video,
        read_indices,
        repeat_mask,
        sample_frames,
        sample_indices,
        sampled_clip,
    )

    cfg = pre["frames"]
    flow = FlowSettings.from_config(pre.get("flow"))
    n, size, pad, sampling = (
        int(cfg["num_frames"]),
        int(cfg["size"]),
        int(cfg["pad_value"]),
        cfg["sampling"],
    )
    if not path.is_file() or path.stat().st_size == 0:
        raise VideoError(f"{path}: empty or missing file")
    cap = open_video(path)
    if not cap.isOpened():
        raise VideoError(f"{path}: OpenCV cannot open it (not a video, or an unsupported codec)")
    hint = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = frame_rate(cap)
    if reason := flow_without_frame_rate(path, flow, fps):
        cap.release()
        raise VideoError(reason)
    wanted = (
        frames_needed(sample_indices(hint, n, sampling), hint, flow)
        if hint > 0
        else np.array([], dtype=int)
    )
    try:
        limit = None if budget is None else budget.remaining
        kept, total = read_indices(cap, wanted, size, pad, count_all=True, limit=limit)
    finally:
        cap.release()
    if budget is not None:
        budget.take(total)
    if total == 0:
        raise VideoError(f"{path}: no decodable frames")
    if reason := too_few_frames(total, pre):
        raise TooFewFrames(path, reason)
    indices = sample_indices(total, n, sampling)
    needed = frames_needed(indices, total, flow)
    if set(needed.tolist()) <= kept.keys():
        return sampled_clip(kept, indices, total, flow, fps), repeat_mask(indices)
    if budget is not None:  # a second pass, up to the last frame needed
        budget.take(int(needed.max()) + 1)
    try:  # the container's count was off
        return sample_frames(path, total, n, size, pad, sampling, flow=flow, fps=fps)
    except OSError as exc:
        raise VideoError(str(exc)) from exc


def video_paths(target: Path) -> list[Path]:
    """The video files of a file or folder (recursively, sorted)."""
    if target.is_dir():
        return sorted(
            p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
        )
    if target.exists():
        return [target]
    raise FileNotFoundError(f"{target}: no such file or folder")
