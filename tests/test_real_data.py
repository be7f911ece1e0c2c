"""Opt-in: download -> clean -> frames on real broadcast video (../shared/data/real/cricket_shots:
6 classes, H.264 .mp4, 480p-720p, 15-30 fps). Skipped when that folder is absent.

    make test-real        # or: pytest -m real_data
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REAL_DATA, ROOT

from pipeline.schema import parse_params
from pipeline.stages.clean import clean
from pipeline.stages.download import run as download
from pipeline.stages.frames import run as extract_frames

CRICKET = REAL_DATA / "cricket_shots"
CLASSES = ["cover", "cut", "leg", "pull", "scoop", "straight"]

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(not CRICKET.is_dir(), reason=f"{CRICKET} is absent"),
]


@pytest.fixture(scope="module")
def cricket_run(tmp_path_factory):
    """The three data stages once, through the real `folder` dataset config."""
    from pipeline.params import compose_params

    root = tmp_path_factory.mktemp("cricket")
    params = compose_params(
        [
            "dataset=folder",
            f"dataset.path={CRICKET}",
            f"dataset.classes=[{','.join(CLASSES)}]",
            "frames.num_frames=8",
            "frames.size=112",
        ],
        conf_dir=ROOT / "conf",
    )
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("DVC_ROOT", str(root))
    try:
        manifest = download(parse_params(params))
        splits = clean(parse_params(params))
        extract_frames(parse_params(params))
    finally:
        mp.undo()
    return root, params, manifest, splits


def test_every_class_folder_is_read(cricket_run):
    _, _, manifest, _ = cricket_run
    assert sorted(manifest["label"].unique()) == CLASSES
    on_disk = sorted(p.relative_to(CRICKET).as_posix() for p in CRICKET.rglob("*.mp4"))
    assert sorted(manifest["source"]) == on_disk


def test_real_clips_probe_with_their_own_fps_and_resolution(cricket_run):
    root, _, manifest, splits = cricket_run
    probe = pd.read_csv(root / "data" / "clean" / "probe.csv")
    assert len(probe) == len(manifest)
    ok = probe[probe["status"] == "ok"]
    assert len(ok) >= 0.9 * len(probe)
    assert ok["fps"].nunique() >= 2 and ok[["width", "height"]].drop_duplicates().shape[0] >= 2
    assert (ok["frames"] >= 30).all() and (ok["duration_s"] >= 1).all()
    assert ok["sha256"].str.len().eq(64).all()


def test_split_is_grouped_and_every_class_is_tested(cricket_run):
    root, _, _, splits = cricket_run
    assert splits.groupby("group")["split"].nunique().max() == 1
    summary = json.loads((root / "data" / "clean" / "dataset.json").read_text())
    for label in CLASSES:
        assert summary["counts"]["test"][label] >= 1, label
        assert summary["counts"]["train"][label] >= 1, label


def test_frames_are_letterboxed_real_content(cricket_run):
    root, _, _, splits = cricket_run
    total = 0
    for split in ("train", "val", "test"):
        d = root / "data" / "frames" / split
        frames = np.load(d / "frames.npy", mmap_mode="r")
        clips = pd.read_csv(d / "clips.csv")
        assert frames.shape == (len(clips), 8, 112, 112, 3)
        total += len(clips)
        # 16:9 footage letterboxed into a square: top and bottom rows are padding, middle is not
        assert frames[:, :, :5].max() == 0
        assert frames[:, :, 40:70].std() > 20
        # frames spread over the clip differ from each other (not one frame repeated)
        assert np.abs(frames[:, 0].astype(int) - frames[:, -1].astype(int)).mean() > 5
    assert total == len(splits)
