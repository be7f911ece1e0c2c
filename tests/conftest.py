"""Shared fixtures: the project root, the composed tiny config, video writing helpers."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """The real conf/ tree composed with `experiment=tiny` (what the end-to-end test runs)."""
    from pipeline.params import compose_params

    return compose_params(["experiment=tiny"], conf_dir=ROOT / "conf")


@pytest.fixture
def in_tmp_root(tmp_path, monkeypatch):
    """Run a stage with `tmp_path` as its workspace (the working directory, where DVC runs
    stages) and as the repository holding the MLflow store (DVC_ROOT)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def write_numbered_video(path: Path, n_frames: int, size=(64, 48), fps=10.0) -> None:
    """An MJPG clip whose frame i is filled with grey level 10 * i (decodable back to i).

    A small corner patch depends on the file name, so two clips are never byte-identical
    (the clean stage quarantines identical files as duplicates).
    """
    tag = zlib.crc32(path.name.encode()) % 200 + 30
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.full((size[1], size[0], 3), min(255, 10 * i), np.uint8)
        frame[:8, :8] = tag
        writer.write(frame)
    writer.release()


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
