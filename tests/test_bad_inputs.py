"""download -> clean -> frames on a folder full of deliberately bad files: each is quarantined
with its reason, nothing stops the stages, and the usable clips (non-ASCII names included)
reach the frame cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import folder_params, write_numbered_video

from pipeline.errors import PipelineError
from pipeline.schema import parse_params
from pipeline.stages.clean import clean
from pipeline.stages.download import run as download
from pipeline.stages.frames import run as extract_frames


@pytest.fixture
def messy_folder(tmp_path):
    src = tmp_path / "footage"
    for label in ("shot", "passing"):
        (src / label).mkdir(parents=True)
        for g in range(4):
            write_numbered_video(src / label / f"{label}_S{g}_act1.avi", 12)
    write_numbered_video(src / "shot" / "schuß_Würfe_7_act1.avi", 12)  # non-ASCII
    (src / "shot" / "zero.avi").write_bytes(b"")  # zero bytes
    (src / "shot" / "notes.avi").write_text("this is not a video\n" * 100)  # text as .avi
    write_numbered_video(src / "shot" / "one_frame_act1.avi", 1)  # one frame
    good = (src / "passing" / "passing_S0_act1.avi").read_bytes()
    (src / "passing" / "corrupt_act1.avi").write_bytes(  # corrupt
        good[:600] + np.random.default_rng(0).integers(0, 256, 20000, np.uint8).tobytes()
    )
    shutil.copy(src / "shot" / "shot_S1_act1.avi", src / "passing" / "looks_like_pass.avi")
    shutil.copy(src / "passing" / "passing_S2_act1.avi", src / "passing" / "copy_of_S2.avi")
    return src


def test_bad_files_are_quarantined_with_reasons(messy_folder, in_tmp_root, tiny_params):
    params = folder_params(tiny_params, messy_folder, ["shot", "passing"])
    download(parse_params(params))
    splits = clean(parse_params(params))
    out = in_tmp_root / "data" / "clean"
    quarantine = pd.read_csv(out / "quarantine.csv").set_index("path")["reason_code"].to_dict()
    assert quarantine == {
        "shot/zero.avi": "empty",
        "shot/notes.avi": "unreadable",
        "shot/one_frame_act1.avi": "too_few_frames",
        "passing/corrupt_act1.avi": quarantine.get("passing/corrupt_act1.avi"),
        # identical bytes under two classes: no copy is trusted
        "shot/shot_S1_act1.avi": "label_conflict",
        "passing/looks_like_pass.avi": "label_conflict",
        # identical bytes within a class: the first (by path) is kept
        "passing/passing_S2_act1.avi": "duplicate",
    }
    assert quarantine["passing/corrupt_act1.avi"] in ("unreadable", "too_few_frames")
    assert "shot/schuß_Würfe_7_act1.avi" in set(splits["path"])
    assert "passing/copy_of_S2.avi" in set(splits["path"])
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["quarantined"] == 7 and summary["usable"] == len(splits) == 8
    assert summary["quarantined_by_reason"]["label_conflict"] == 2

    extract_frames(parse_params(params))
    cached = pd.concat(
        pd.read_csv(in_tmp_root / "data" / "frames" / s / "clips.csv")
        for s in ("train", "val", "test")
    )
    assert sorted(cached["path"]) == sorted(splits["path"])
    for split in ("train", "val", "test"):
        frames = np.load(in_tmp_root / "data" / "frames" / split / "frames.npy")
        assert frames.shape[1:] == (6, 80, 80, 3) and frames.max() > 0


def test_class_left_below_minimum_stops_with_its_name(messy_folder, in_tmp_root, tiny_params):
    for f in (messy_folder / "passing").glob("passing_S*"):
        f.unlink()
    params = folder_params(tiny_params, messy_folder, ["shot", "passing"], min_clips_per_class=2)
    download(parse_params(params))
    with pytest.raises(PipelineError, match=r"min_clips_per_class=2.*'passing': 1") as err:
        clean(parse_params(params))
    assert not (in_tmp_root / "data" / "clean").exists()
    # the stage failed, so no quarantine report exists: the message lists the failing
    # class's left-out clips with their reasons, and only that class's
    listed = str(err.value).split("left out:\n", 1)[1].splitlines()
    assert any(line.startswith("  passing/corrupt_act1.avi: ") for line in listed), listed
    assert all(line.startswith("  passing/") for line in listed), listed


def test_nothing_usable_stops_the_stage(tmp_path, in_tmp_root, tiny_params):
    src = tmp_path / "footage"
    for label in ("shot", "passing"):
        (src / label).mkdir(parents=True)
        (src / label / "a.avi").write_bytes(b"")
        (src / label / "b.avi").write_text("nope")
    params = folder_params(tiny_params, src, ["shot", "passing"])
    download(parse_params(params))
    with pytest.raises(PipelineError, match="'shot': 0"):
        clean(parse_params(params))


def test_split_file_overrides_the_drawn_split(
    messy_folder, tmp_path, in_tmp_root, tiny_params, caplog
):
    rows = [
        ("shot/shot_S0_act1.avi", "shot", "train"),
        ("shot_S2_act1.avi", "shot", "train"),
        ("shot/shot_S3_act1.avi", "shot", "val"),
        ("schuß_Würfe_7_act1.avi", "shot", "test"),
        ("passing/passing_S0_act1.avi", "passing", "train"),
        ("passing/passing_S1_act1.avi", "shot", "train"),  # label disagrees with folder
        ("passing/passing_S3_act1.avi", "passing", "test"),
        ("passing/copy_of_S2.avi", "passing", "val"),
        ("passing/gone_act9.avi", "passing", "test"),
    ]  # not in the dataset
    split_file = tmp_path / "official.csv"
    pd.DataFrame(rows, columns=["clip", "label", "split"]).to_csv(split_file, index=False)
    params = folder_params(tiny_params, messy_folder, ["shot", "passing"], min_clips_per_class=2)
    params["dataset"]["split_file"] = str(split_file)
    download(parse_params(params))
    splits = clean(parse_params(params)).set_index("path")["split"].to_dict()
    assert splits == {
        "shot/shot_S0_act1.avi": "train",
        "shot/shot_S2_act1.avi": "train",
        "shot/shot_S3_act1.avi": "val",
        "shot/schuß_Würfe_7_act1.avi": "test",
        "passing/passing_S0_act1.avi": "train",
        "passing/passing_S3_act1.avi": "test",
        "passing/copy_of_S2.avi": "val",
    }
    out = in_tmp_root / "data" / "clean"
    quarantine = pd.read_csv(out / "quarantine.csv").set_index("path")["reason_code"]
    assert quarantine["passing/passing_S1_act1.avi"] == "label_conflict"
    assert quarantine["passing/passing_S2_act1.avi"] == "duplicate"
    assert quarantine["shot/shot_S1_act1.avi"] == "label_conflict"
    unmatched = pd.read_csv(out / "split_file_unmatched.csv")
    assert unmatched["clip"].tolist() == ["passing/gone_act9.avi"]
    assert "not in the dataset" in caplog.text
    assert json.loads((out / "dataset.json").read_text())["split_source"] == "split_file"
