"""Probing drops unusable clips with a reason; the split never puts a scene in two splits."""

import pandas as pd
import pytest
from conftest import folder_params, write_numbered_video

from pipeline.data.splits import group_of, split_by_group
from pipeline.data.video import probe_clip
from pipeline.errors import PipelineError
from pipeline.schema import parse_params
from pipeline.stages.clean import clean

PATTERN = r"^(?P<group>.+?)_act\d+$"


def test_group_is_the_name_without_act_suffix():
    assert group_of("crossing/crossing_KS_33_act2.avi", PATTERN) == "crossing_KS_33"
    assert group_of("x/odd-name.avi", PATTERN) == "odd-name"


def make_clips(groups_per_class: dict[str, int], clips_per_group: int = 3) -> pd.DataFrame:
    rows = [
        {"path": f"{c}/{c}_S_{g}_act{k}.avi", "label": c, "group": f"{c}_S_{g}"}
        for c, n in groups_per_class.items()
        for g in range(n)
        for k in range(1, clips_per_group + 1)
    ]
    return pd.DataFrame(rows)


def test_no_group_in_two_splits_and_every_class_in_every_split():
    clips = make_clips({"crossing": 20, "running": 3, "shot": 7, "defence": 4})
    clips["split"] = split_by_group(clips, 0.15, 0.2, seed=1)
    assert clips.groupby("group")["split"].nunique().max() == 1
    for label, part in clips.groupby("label"):
        assert set(part["split"]) == {"train", "val", "test"}, label
    sizes = clips[clips["label"] == "crossing"].groupby("split")["group"].nunique()
    assert sizes["test"] == 4 and sizes["val"] == 3 and sizes["train"] == 13


def test_split_is_deterministic_by_seed():
    clips = make_clips({"a": 10, "b": 6})
    first = split_by_group(clips, 0.2, 0.2, seed=3)
    assert first.equals(split_by_group(clips, 0.2, 0.2, seed=3))
    assert not first.equals(split_by_group(clips, 0.2, 0.2, seed=4))


def test_class_with_two_groups_keeps_a_test_group_and_warns(caplog):
    clips = make_clips({"a": 10, "rare": 2})
    split = split_by_group(clips, 0.15, 0.2, seed=0)
    rare = set(split[clips["label"] == "rare"])
    assert rare == {"train", "test"}
    assert "rare" in caplog.text


def test_probe_reports_bad_files(tmp_path):
    (tmp_path / "empty.avi").write_bytes(b"")
    (tmp_path / "text.avi").write_text("not a video at all\n" * 10)
    write_numbered_video(tmp_path / "ok.avi", 12)
    assert probe_clip(tmp_path / "empty.avi")["error"]
    assert probe_clip(tmp_path / "text.avi")["error"]
    info = probe_clip(tmp_path / "ok.avi")
    assert (
        info["error"] == "" and info["frames"] == 12 and (info["width"], info["height"]) == (64, 48)
    )


def test_clean_stage_drops_with_reasons_and_keeps_the_rest(tmp_path, in_tmp_root, tiny_params):
    raw = tmp_path / "data" / "raw"
    rows = []
    for label in ("a", "b"):
        (raw / label).mkdir(parents=True)
        for g in range(3):
            name = f"{label}/{label}_S_{g}_act1.avi"
            write_numbered_video(raw / name, 12)
            rows.append({"path": name, "label": label})
    (raw / "a" / "a_S_9_act1.avi").write_bytes(b"")
    write_numbered_video(raw / "b" / "b_S_9_act1.avi", 1)
    rows += [{"path": "a/a_S_9_act1.avi", "label": "a"}, {"path": "b/b_S_9_act1.avi", "label": "b"}]
    pd.DataFrame(rows).to_csv(raw / "manifest.csv", index=False)
    splits = clean(parse_params(folder_params(tiny_params, raw, ["a", "b"])))
    assert len(splits) == 6
    probe = pd.read_csv(tmp_path / "data" / "clean" / "probe.csv")
    dropped = probe[probe["status"] == "dropped"].set_index("path")["reason"]
    assert "empty" in dropped["a/a_S_9_act1.avi"]
    assert "min_frames" in dropped["b/b_S_9_act1.avi"]


def test_clean_refuses_unknown_labels(tmp_path, in_tmp_root, tiny_params):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    pd.DataFrame([{"path": "x/x_1_act1.avi", "label": "x"}]).to_csv(
        raw / "manifest.csv", index=False
    )
    with pytest.raises(PipelineError, match="not in dataset.classes"):
        clean(parse_params(tiny_params))
