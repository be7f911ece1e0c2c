"""Reading video the same way everywhere: open (with rotation), probe, hash, sample frame
indices, decode the sampled frames, letterbox.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.flow import FlowSettings, clip_flow, successor_indices, with_flow

log = logging.getLogger(__name__)


def open_video(path: Path, threads: int | None = None) -> cv2.VideoCapture:
    """A capture on `path` that applies rotation metadata; check `isOpened()` on the result.

    `threads` caps FFmpeg's decoding threads (None: FFmpeg's default, all cores). Worker
    processes pass 1: on few cores, one thread per process decodes faster than nested threads.
    Files FFmpeg cannot open are tried once more with OpenCV's other backends.
    """
    cap = None
    if threads:
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, int(threads)])
    if cap is None or not cap.isOpened():
        cap = cv2.VideoCapture(str(path))
    cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)  # phone footage: upright frames
    return cap


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def frame_rate(cap: cv2.VideoCapture) -> float:
    """The frame rate an open capture reports (0.0: none), as the clean stage records it."""
    return round(float(cap.get(cv2.CAP_PROP_FPS) or 0.0), 3)


def flow_without_frame_rate(path: Path, flow, fps: float) -> str | None:
    """Why a clip cannot be sampled with its optical flow (`flow` settings given), which is
    measured per second: the video reports no frame rate. None when it can."""
    if flow is not None and fps <= 0:
        return f"{path}: the video reports no frame rate, which optical flow needs"
    return None


def probe_clip(path: Path, threads: int | None = None) -> dict:
    """Decode a clip once: frames actually decodable, fps, size, duration. Never raises.

    Every frame is decoded (`grab`), not just counted from the container header, which is
    often wrong or missing; only the first is converted, to read the displayed size (after
    OpenCV applies the rotation metadata). `threads` caps FFmpeg's decoding threads.
    """
    info = {
        "frames": 0,
        "fps": 0.0,
        "width": 0,
        "height": 0,
        "duration_s": 0.0,
        "codec": "",
        "error": "",
    }
    if not path.is_file() or path.stat().st_size == 0:
        info["error"] = "empty or missing file"
        return info
    cap = open_video(path, threads)
    try:
        if not cap.isOpened():
            info["error"] = "OpenCV cannot open it (not a video, or an unsupported codec)"
            return info
        info["fps"] = frame_rate(cap)
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC) or 0)
        info["codec"] = "".join(chr((fourcc >> 8 * i) & 0xFF) for i in range(4)).strip("\x00 ")
        while cap.grab():
            if info["frames"] == 0:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                info["height"], info["width"] = frame.shape[:2]
            info["frames"] += 1
    finally:
        cap.release()
    if info["frames"] == 0:
        info["error"] = "no decodable frames"
    elif info["fps"] > 0:
        info["duration_s"] = round(info["frames"] / info["fps"], 3)
    return info


def probe_and_hash(path: Path) -> dict:
    """probe_clip plus the file's sha256: one worker task of the clean stage (one decoding
    thread per worker; the worker processes are the parallelism)."""
    cv2.setNumThreads(1)
    return {**probe_clip(path, threads=1), "sha256": sha256_of(path) if path.is_file() else ""}


SAMPLINGS = ("uniform", "center", "start")


def sample_indices(total: int, n: int, sampling: str = "uniform") -> np.ndarray:
    """`n` frame indices out of a clip of `total` frames.

    - `uniform` (default): the centre of each of n equal segments, spread over the whole clip;
    - `center`: n consecutive frames around the middle;
    - `start`: the first n frames (what the reference cnn_gru notebook did; for comparison).
    Clips shorter than n repeat frames (each index still inside the clip), never pad with zeros.
    """
    if total < 1 or n < 1:
        raise ValueError(f"cannot sample {n} frames from a clip of {total} frames")
    if sampling == "uniform":
        return np.minimum(((np.arange(n) + 0.5) * total / n).astype(int), total - 1)
    if sampling in ("center", "start"):
        first = max(0, (total - n) // 2) if sampling == "center" else 0
        return np.minimum(first + np.arange(n), total - 1)
    raise ValueError(f"frames.sampling={sampling!r} is not one of {SAMPLINGS}")


def letterbox(frame: np.ndarray, size: int, pad_value: int = 0) -> np.ndarray:
    """Resize to fit a size x size square keeping the aspect ratio; pad the rest."""
    h, w = frame.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(frame, (nw, nh), interpolation=interp)
    out = np.full((size, size, frame.shape[2]), pad_value, dtype=frame.dtype)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def display_frame(frame: np.ndarray, size: int, pad_value: int) -> np.ndarray:
    """A decoded (BGR) frame as cached: RGB, letterboxed into size x size."""
    return letterbox(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size, pad_value)


def read_indices(
    cap: cv2.VideoCapture,
    indices: np.ndarray,
    size: int,
    pad_value: int,
    count_all: bool = False,
    limit: int | None = None,
) -> tuple[dict[int, np.ndarray], int]:
    """Read an open capture front to back, keeping (letterboxed, RGB) only the frames in
    `indices`. Stops after the last of them, or with `count_all` at the end of the video, so
    the count returned is then every decodable frame. Returns the kept frames and the count.
    With `limit`, decoding also stops after `limit + 1` frames (a count over `limit` says the
    video is longer than that).

    Frames are grabbed without conversion and only the wanted ones retrieved, so memory holds
    n small frames and one full-size frame whatever the clip's length or resolution.
    """
    wanted = set(indices.tolist())
    last = int(indices.max()) if len(indices) else -1
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    while (count_all or decoded <= last) and (limit is None or decoded <= limit) and cap.grab():
        if decoded in wanted:
            ok, frame = cap.retrieve()
            if ok:
                kept[decoded] = display_frame(frame, size, pad_value)
        decoded += 1
    return kept, decoded


def decode_indices(
    path: Path, indices: np.ndarray, size: int, pad_value: int, threads: int | None = None
) -> tuple[dict[int, np.ndarray], int]:
    """`read_indices` on the clip at `path`; `threads` caps FFmpeg's decoding threads (None:
    its default). Returns the kept frames and how many frames were decoded."""
    cap = open_video(path, threads)
    if not cap.isOpened():
        raise OSError(f"OpenCV cannot open {path}")
    try:
        return read_indices(cap, indices, size, pad_value)
    finally:
        cap.release()


def sample_frames(
    path: Path,
    total: int,
    n: int,
    size: int,
    pad_value: int = 0,
    sampling: str = "uniform",
    threads: int | None = None,
    flow: FlowSettings | None = None,
    fps: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The n sampled frames of one clip (n x size x size x 3 RGB uint8) and their mask; with
    `flow`, each frame's optical flow towards the next frame of the video follows as channels
    4-5 (n x size x size x 5, see `pipeline.data.flow`; `fps` is the clip's frame rate).

    `mask[i]` is False where frame i repeats frame i-1 (a clip shorter than n). If the clip
    decodes to fewer frames than the probe counted, the sample is redrawn over the frames that
    do decode (and logged); a clip that yields none raises IOError naming it.
    """
    if reason := flow_without_frame_rate(path, flow, fps):
        raise OSError(reason)
    indices = sample_indices(total, n, sampling)
    needed = frames_needed(indices, total, flow)
    kept, decoded = decode_indices(path, needed, size, pad_value, threads)
    if not set(needed.tolist()) <= kept.keys():
        usable = min(decoded, total)
        if usable < 1:
            raise OSError(f"{path}: no frame could be decoded (probe counted {total})")
        log.warning(
            "%s: only %d of %d probed frames decode; resampling over those", path, usable, total
        )
        total = usable
        indices = sample_indices(total, n, sampling)
        needed = frames_needed(indices, total, flow)
        kept, _ = decode_indices(path, needed, size, pad_value, threads)
        if not set(needed.tolist()) <= kept.keys():
            raise OSError(
                f"{path}: frames {sorted(set(needed.tolist()) - kept.keys())} could "
                f"not be decoded twice in a row"
            )
    return sampled_clip(kept, indices, total, flow, fps), repeat_mask(indices)


def frames_needed(indices: np.ndarray, total: int, flow: FlowSettings | None) -> np.ndarray:
    """The frames to decode for a sample: its own, and with `flow` each one's successor."""
    if flow is None:
        return np.asarray(indices)
    return np.union1d(indices, successor_indices(indices, total))


def sampled_clip(
    kept: dict[int, np.ndarray],
    indices: np.ndarray,
    total: int,
    flow: FlowSettings | None,
    fps: float,
) -> np.ndarray:
    """The sampled frames out of the decoded ones (`kept`, by frame number), with their
    optical flow as channels 4-5 when `flow` is set; `total` frames in the clip."""
    frames = np.stack([kept[i] for i in indices.tolist()])
    if flow is None:
        return frames
    successors = np.stack([kept[i] for i in successor_indices(indices, total).tolist()])
    return with_flow(frames, clip_flow(frames, successors, fps, flow))


def repeat_mask(indices: np.ndarray) -> np.ndarray:
    """False where a sampled frame repeats the one before it (a clip shorter than the sample),
    along the last axis (one clip's indices, or one row per clip)."""
    mask = np.ones(indices.shape, dtype=bool)
    mask[..., 1:] = indices[..., 1:] != indices[..., :-1]
    return mask


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Write frames to an MJPG .avi; raise if OpenCV cannot open a writer."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open a video writer for {path}")
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
