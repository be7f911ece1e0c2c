"""Stage `clean`: probe every clip, drop unusable ones with a report, split by scene.

Outputs (in `paths.clean`):
- `probe.csv`: every clip with frames, fps, size, sha256, status (`ok`/`dropped`) and reason;
- `splits.csv`: the usable clips with label, group and split (train/val/test);
- `dataset.json`: class list, counts per split and class, and the dataset content hash.

The split is stratified by class and grouped by recording: the clips of one scene
(`<scene>_act1`, `<scene>_act2`, ...) always land in the same split, so nothing of a test
scene (background, players, lighting) is seen in training.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.common import SPLITS, atomic_dir, resolve, stage_cli, write_json_atomic

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def probe_clip(path: Path) -> dict:
    """Decode a clip once: frames actually decodable, fps and size. Never raises on bad video."""
    info = {"frames": 0, "fps": 0.0, "width": 0, "height": 0, "error": ""}
    if not path.is_file() or path.stat().st_size == 0:
        info["error"] = "empty or missing file"
        return info
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            info["error"] = "OpenCV cannot open it"
            return info
        info["fps"] = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if info["frames"] == 0:
                info["height"], info["width"] = frame.shape[:2]
            info["frames"] += 1
    finally:
        cap.release()
    if info["frames"] == 0:
        info["error"] = "no decodable frames"
    return info


def drop_reason(info: dict, cfg: dict) -> str:
    if info["error"]:
        return info["error"]
    if info["frames"] < cfg["min_frames"]:
        return f"{info['frames']} frames < clean.min_frames={cfg['min_frames']}"
    if info["width"] < cfg["min_width"] or info["height"] < cfg["min_height"]:
        return (f"{info['width']}x{info['height']} smaller than "
                f"clean.min_width x min_height={cfg['min_width']}x{cfg['min_height']}")
    return ""


def group_of(path: str, pattern: str) -> str:
    """The recording a clip was cut from: the named group `group` of `pattern` on the stem."""
    stem = Path(path).stem
    match = re.match(pattern, stem)
    return match.group("group") if match else stem


def split_by_group(clips: pd.DataFrame, val_fraction: float, test_fraction: float,
                   seed: int) -> pd.Series:
    """Assign whole groups to train/val/test, separately per class, deterministic by seed.

    Every class with at least three groups gets at least one group in each split; classes with
    fewer groups are warned about by name (two groups: train and test; one group: train only).
    A group whose clips carry different labels is assigned as a unit under its majority label.
    """
    group_label = clips.groupby("group")["label"].agg(lambda s: s.value_counts().index[0])
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in sorted(group_label.unique()):
        groups = sorted(group_label.index[group_label == label])
        rng.shuffle(groups)
        n = len(groups)
        n_test = max(1, round(n * test_fraction)) if n >= 2 else 0
        n_val = max(1, round(n * val_fraction)) if n >= 3 else 0
        while n - n_test - n_val < 1 and n_val + n_test > 0:  # keep a training group
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        if n < 3:
            log.warning("class %r has only %d recording group(s): %s", label, n,
                        "no validation or test clips" if n == 1 else "no validation clips")
        for i, group in enumerate(groups):
            assignment[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return clips["group"].map(assignment)


def clean(params: dict) -> pd.DataFrame:
    cfg, ds = params["clean"], params["dataset"]
    raw = resolve(params["paths"]["raw"])
    manifest_path = raw / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run the download stage first")
    manifest = pd.read_csv(manifest_path)
    unknown = sorted(set(manifest["label"]) - set(ds["classes"]))
    if unknown:
        raise ValueError(f"{manifest_path} has labels not in dataset.classes: {unknown}")

    rows = []
    for rec in tqdm(manifest.to_dict("records"), desc="probe clips", unit="clip"):
        path = raw / rec["path"]
        info = probe_clip(path)
        reason = drop_reason(info, cfg)
        rows.append({
            **rec, **{k: info[k] for k in ("frames", "fps", "width", "height")},
            "sha256": sha256_of(path) if path.is_file() else "",
            "status": "dropped" if reason else "ok", "reason": reason,
        })
    probe = pd.DataFrame(rows)
    for rec in probe[probe["status"] == "dropped"].itertuples():
        log.warning("dropped %s: %s", rec.path, rec.reason)

    usable = probe[probe["status"] == "ok"].copy()
    if usable.empty:
        raise ValueError(f"no usable clips in {raw}: see the reasons in the probe report")
    usable["group"] = [group_of(p, cfg["group_pattern"]) for p in usable["path"]]
    usable["split"] = split_by_group(usable, cfg["val_fraction"], cfg["test_fraction"],
                                     params["seed"])
    splits = usable[["path", "label", "group", "split", "frames", "fps", "width", "height"]]
    dataset_hash = hashlib.sha256(
        "".join(f"{p}\t{l}\t{h}\n" for p, l, h in
                sorted(zip(usable["path"], usable["label"], usable["sha256"]))).encode()
    ).hexdigest()
    counts = {s: splits[splits["split"] == s]["label"].value_counts().to_dict() for s in SPLITS}
    summary = {
        "name": ds["name"],
        "classes": list(ds["classes"]),
        "dataset_hash": dataset_hash,
        "clips": int(len(probe)),
        "usable": int(len(usable)),
        "dropped": int((probe["status"] == "dropped").sum()),
        "counts": counts,
    }
    with atomic_dir(resolve(params["paths"]["clean"])) as tmp:
        probe.to_csv(tmp / "probe.csv", index=False)
        splits.to_csv(tmp / "splits.csv", index=False)
        write_json_atomic(tmp / "dataset.json", summary)
    log.info("clean: %d of %d clips usable (%d dropped); split train %d / val %d / test %d "
             "clips; dataset hash %s", len(usable), len(probe), summary["dropped"],
             *(int((splits["split"] == s).sum()) for s in SPLITS), dataset_hash[:12])
    return splits


def main(argv: list[str] | None = None) -> None:
    stage_cli("clean", __doc__.splitlines()[0], lambda p, a: clean(p), argv)


if __name__ == "__main__":
    main()
