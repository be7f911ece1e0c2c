"""Opening video files with OpenCV the same way in every stage."""

from __future__ import annotations

from pathlib import Path

import cv2


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
