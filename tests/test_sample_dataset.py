"""The embedded sample: real decodable videos, UNIRI-HBD layout, deterministic, configurable."""

import re

import cv2

from pipeline.data.sample import generate_sample
from pipeline.data.video import sha256_of
from pipeline.schema.sections import SampleSpec

NAME = re.compile(r"^(?P<cls>[a-z-]+)/(?P=cls)_[A-Z]{2}_\d+_act\d+\.avi$")


def small_cfg(tiny_params, **changes):
    cfg = {**tiny_params["dataset"]["sample"], **changes}
    cfg["counts"] = {**cfg["counts"], "running": 1}
    return cfg


def test_layout_names_and_counts(tmp_path, tiny_params):
    classes = tiny_params["dataset"]["classes"]
    cfg = small_cfg(tiny_params, clips_per_scene=2)
    rows = generate_sample(tmp_path, SampleSpec.model_validate(cfg), classes)
    assert {r["label"] for r in rows} == set(classes) and len(classes) == 7
    for label in classes:
        assert sum(r["label"] == label for r in rows) == cfg["counts"][label]
    for r in rows:
        assert NAME.match(r["path"]), r["path"]
        assert (tmp_path / r["path"]).is_file()
    # clips of a scene share its name prefix: act1 and act2 of the same scene exist
    assert any(r["path"].endswith("_act2.avi") for r in rows)


def test_clips_decode_with_configured_size_and_length(tmp_path, tiny_params):
    cfg = small_cfg(tiny_params)
    rows = generate_sample(
        tmp_path, SampleSpec.model_validate(cfg), tiny_params["dataset"]["classes"]
    )
    cap = cv2.VideoCapture(str(tmp_path / rows[0]["path"]))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    assert cfg["min_length"] <= len(frames) <= cfg["max_length"]
    assert frames[0].shape == (cfg["height"], cfg["width"], 3)
    assert abs(cap.get(cv2.CAP_PROP_FPS) - cfg["fps"]) < 1e-3


def test_generation_is_deterministic_by_seed(tmp_path, tiny_params):
    classes = tiny_params["dataset"]["classes"]
    cfg = small_cfg(tiny_params)
    a = generate_sample(tmp_path / "a", SampleSpec.model_validate(cfg), classes)
    b = generate_sample(tmp_path / "b", SampleSpec.model_validate(cfg), classes)
    c = generate_sample(
        tmp_path / "c", SampleSpec.model_validate({**cfg, "seed": cfg["seed"] + 1}), classes
    )
    hashes = lambda d, rows: [sha256_of(d / r["path"]) for r in rows]  # noqa: E731
    assert hashes(tmp_path / "a", a) == hashes(tmp_path / "b", b)
    assert hashes(tmp_path / "a", a) != hashes(tmp_path / "c", c)
