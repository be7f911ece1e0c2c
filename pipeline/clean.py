"""Stage `clean`: probe every clip, quarantine unusable ones with a report, split by scene.

Outputs (in `paths.clean`):
- `probe.csv`: every clip with frames, fps, size, duration, codec, sha256, status
  (`ok`/`dropped`) and reason;
- `quarantine.csv`: the clips left out and why (unreadable, empty, too_few_frames, too_short,
  too_small, duplicate, label_conflict, not_in_split_file);
- `splits.csv`: the usable clips with label, group and split (train/val/test);
- `dataset.json`: class list, counts per split and class, quarantine counts, content hash.

The split is stratified by class and grouped by recording: the clips of one scene
(`<scene>_act1`, `<scene>_act2`, ...) always land in the same split, so nothing of a test
scene (background, players, lighting) is seen in training. `dataset.split_file` replaces it
with a given split. One bad file never stops the stage; no usable clip, or a class below
`clean.min_clips_per_class`, does, naming the class.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.common import (SPLITS, PipelineError, atomic_dir, parallel_map, resolve, stage_cli,
                             write_json_atomic)
from pipeline.video import open_video

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def probe_clip(path: Path, threads: int | None = None) -> dict:
    """Decode a clip once: frames actually decodable, fps, size, duration. Never raises.

    Every frame is decoded (`grab`), not just counted from the container header, which is
    often wrong or missing; only the first is converted, to read the displayed size (after
    OpenCV applies the rotation metadata). `threads` caps FFmpeg's decoding threads.
    """
    info = {"frames": 0, "fps": 0.0, "width": 0, "height": 0, "duration_s": 0.0, "codec": "",
            "error": ""}
    if not path.is_file() or path.stat().st_size == 0:
        info["error"] = "empty or missing file"
        return info
    cap = open_video(path, threads)
    try:
        if not cap.isOpened():
            info["error"] = "OpenCV cannot open it (not a video, or an unsupported codec)"
            return info
        info["fps"] = round(float(cap.get(cv2.CAP_PROP_FPS) or 0.0), 3)
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


def drop_reason(info: dict, cfg: dict) -> tuple[str, str]:
    """(reason code, human-readable reason) for an unusable clip; ("", "") when usable."""
    if info["error"]:
        return ("empty" if info["error"].startswith("empty") else "unreadable"), info["error"]
    if info["frames"] < cfg["min_frames"]:
        return "too_few_frames", f"{info['frames']} frames < clean.min_frames={cfg['min_frames']}"
    min_duration = float(cfg.get("min_duration_s") or 0)
    if info["fps"] > 0 and info["duration_s"] < min_duration:
        return "too_short", (f"{info['duration_s']} s < clean.min_duration_s="
                             f"{cfg['min_duration_s']}")
    if info["width"] < cfg["min_width"] or info["height"] < cfg["min_height"]:
        return "too_small", (f"{info['width']}x{info['height']} smaller than "
                             f"clean.min_width x min_height={cfg['min_width']}x{cfg['min_height']}")
    return "", ""


def mark_duplicates(probe: pd.DataFrame) -> pd.DataFrame:
    """Quarantine byte-identical clips: later copies within a class, every copy across classes.

    A clip filed under two actions has no trustworthy label, so none of its copies is used;
    within one class the first copy (in path order) is kept.
    """
    probe = probe.copy()
    ok = probe[(probe["status"] == "ok") & (probe["sha256"] != "")]
    for _, copies in ok.groupby("sha256"):
        if len(copies) < 2:
            continue
        copies = copies.sort_values("path")
        if copies["label"].nunique() > 1:
            labels = ", ".join(sorted(copies["label"].unique()))
            for idx in copies.index:
                others = ", ".join(p for p in copies["path"] if p != probe.at[idx, "path"])
                probe.loc[idx, ["status", "reason_code", "reason"]] = (
                    "dropped", "label_conflict",
                    f"identical bytes filed under classes {labels} (also {others})")
        else:
            first = copies["path"].iloc[0]
            for idx in copies.index[1:]:
                probe.loc[idx, ["status", "reason_code", "reason"]] = (
                    "dropped", "duplicate", f"byte-identical to {first}")
    return probe


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


def apply_split_file(usable: pd.DataFrame, split_file: Path, classes: list[str],
                     tmp: Path) -> pd.DataFrame:
    """Take train/val/test from `dataset.split_file` (clip, label, split) instead of drawing them.

    `clip` is a path relative to the dataset root or a bare file name. Clips the file does not
    list, or lists under another label, are quarantined; entries matching no clip are written
    to `split_file_unmatched.csv`. Returns `usable` with `split` set and quarantined rows
    marked (status/reason columns).
    """
    if not split_file.is_file():
        raise FileNotFoundError(f"dataset.split_file={split_file} not found")
    listed = pd.read_csv(split_file, dtype=str)
    missing = {"clip", "label", "split"} - set(listed.columns)
    if missing:
        raise PipelineError(f"dataset.split_file={split_file} lacks columns {sorted(missing)} "
                            f"(needs clip, label, split)")
    bad_split = sorted(set(listed["split"]) - set(SPLITS))
    bad_label = sorted(set(listed["label"]) - set(classes))
    if bad_split:
        raise PipelineError(f"dataset.split_file={split_file}: split values {bad_split} are not "
                            f"train/val/test")
    if bad_label:  # classes not selected in dataset.classes: not an error
        log.info("split file: ignoring %d rows of classes not in dataset.classes (%s)",
                 int((~listed["label"].isin(classes)).sum()), ", ".join(bad_label))
    listed = listed[listed["label"].isin(classes)]
    names = usable["source"].map(lambda p: Path(p).name)
    unique_names = names[~names.duplicated(keep=False)]
    by_source = dict(zip(usable["source"], usable.index))
    by_name = dict(zip(unique_names, unique_names.index))
    usable = usable.assign(split="")
    matched = set()
    for rec in listed.itertuples():
        clip = rec.clip.replace("\\", "/").removeprefix("./")
        idx = by_source.get(clip, by_name.get(clip))
        if idx is None:
            continue
        matched.add(rec.Index)
        if usable.at[idx, "label"] != rec.label:
            usable.loc[idx, ["status", "reason_code", "reason"]] = (
                "dropped", "label_conflict",
                f"dataset.split_file labels it {rec.label}, its folder says {usable.at[idx, 'label']}")
        else:
            usable.at[idx, "split"] = rec.split
    unlisted = (usable["split"] == "") & (usable["status"] == "ok")
    usable.loc[unlisted, ["status", "reason_code", "reason"]] = (
        "dropped", "not_in_split_file", f"not listed in {split_file.name}")
    unmatched = listed.loc[~listed.index.isin(matched)]
    unmatched.to_csv(tmp / "split_file_unmatched.csv", index=False)
    if len(unmatched):
        log.warning("split file: %d listed clips are not in the dataset (e.g. %s); see "
                    "split_file_unmatched.csv", len(unmatched), ", ".join(unmatched["clip"][:5]))
    if unlisted.any():
        log.warning("split file: %d clips of the dataset are not listed and are left out",
                    int(unlisted.sum()))
    return usable


def check_class_minimum(usable: pd.DataFrame, classes: list[str], minimum: int) -> None:
    counts = usable["label"].value_counts()
    short = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < minimum}
    if short:
        raise PipelineError(
            f"classes below clean.min_clips_per_class={minimum} usable clips: {short}. Add "
            f"clips, merge the class (dataset.merge) or drop it from dataset.classes; the "
            f"quarantine report says why clips were left out")


def warn_missing_test_classes(splits: pd.DataFrame, classes: list[str]) -> None:
    for split in ("test", "val"):
        absent = [c for c in classes if not ((splits["split"] == split)
                                             & (splits["label"] == c)).any()]
        if absent:
            log.warning("no %s clips for classes %s: their %s scores will be undefined",
                        split, absent, split)


def clean(params: dict) -> pd.DataFrame:
    cfg, ds = params["clean"], params["dataset"]
    classes = list(ds["classes"])
    raw = resolve(params["paths"]["raw"])
    manifest_path = raw / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run the download stage first")
    manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str})
    if "source" not in manifest:
        manifest["source"] = manifest["path"]
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise PipelineError(f"{manifest_path} has labels not in dataset.classes: {unknown}")

    infos = list(parallel_map(probe_and_hash, [raw / p for p in manifest["path"]],
                              params.get("workers"), "probe clips"))
    probe = pd.concat([manifest.reset_index(drop=True), pd.DataFrame(infos)], axis=1)
    reasons = [drop_reason(info, cfg) for info in infos]
    probe["reason_code"] = [code for code, _ in reasons]
    probe["reason"] = [text for _, text in reasons]
    probe["status"] = np.where(probe["reason_code"] == "", "ok", "dropped")
    probe = mark_duplicates(probe)
    probe["group"] = [group_of(p, cfg["group_pattern"]) for p in probe["path"]]

    with atomic_dir(resolve(params["paths"]["clean"])) as tmp:
        if ds.get("split_file"):
            probe = apply_split_file(probe, resolve(ds["split_file"]), classes, tmp)
        usable = probe[probe["status"] == "ok"].copy()
        check_class_minimum(usable, classes, int(cfg["min_clips_per_class"]))
        if ds.get("split_file"):
            leaks = usable.groupby("group")["split"].nunique()
            if (leaks > 1).any():
                log.warning("split file puts %d recording groups in more than one split (e.g. "
                            "%s): scores may be optimistic", int((leaks > 1).sum()),
                            ", ".join(leaks.index[leaks > 1][:3]))
        else:
            usable["split"] = split_by_group(usable, cfg["val_fraction"], cfg["test_fraction"],
                                             params["seed"])
        quarantine = probe[probe["status"] == "dropped"]
        for rec in quarantine.itertuples():
            log.warning("quarantined %s: %s", rec.path, rec.reason)
        splits = usable[["path", "label", "group", "split", "frames", "fps", "width", "height"]]
        warn_missing_test_classes(splits, classes)
        dataset_hash = hashlib.sha256(
            "".join(f"{p}\t{l}\t{h}\n" for p, l, h in
                    sorted(zip(usable["path"], usable["label"], usable["sha256"]))).encode()
        ).hexdigest()
        # which clip is in which split: scores (and champions) compare only on the same one
        split_hash = hashlib.sha256(
            "".join(f"{p}\t{s}\n" for p, s in sorted(zip(splits["path"], splits["split"])))
            .encode()).hexdigest()
        summary = {
            "name": ds["name"],
            "classes": classes,
            "dataset_hash": dataset_hash,
            "split_hash": split_hash,
            "clips": int(len(probe)),
            "usable": int(len(usable)),
            "quarantined": int(len(quarantine)),
            "quarantined_by_reason": {k: int(v) for k, v in
                                      quarantine["reason_code"].value_counts().items()},
            "split_source": "split_file" if ds.get("split_file") else "grouped_random",
            "counts": {s: {c: int(((splits["split"] == s) & (splits["label"] == c)).sum())
                           for c in classes} for s in SPLITS},
        }
        probe.drop(columns=["group"]).to_csv(tmp / "probe.csv", index=False)
        quarantine[["path", "label", "reason_code", "reason"]].to_csv(tmp / "quarantine.csv",
                                                                      index=False)
        splits.to_csv(tmp / "splits.csv", index=False)
        write_json_atomic(tmp / "dataset.json", summary)
    log.info("clean: %d of %d clips usable (%d quarantined%s); split train %d / val %d / test %d "
             "clips; dataset hash %s", len(usable), len(probe), len(quarantine),
             "".join(f", {v} {k}" for k, v in summary["quarantined_by_reason"].items()),
             *(int((splits["split"] == s).sum()) for s in SPLITS), dataset_hash[:12])
    return splits


def main(argv: list[str] | None = None) -> None:
    stage_cli("clean", __doc__.splitlines()[0], lambda p, a: clean(p), argv)


if __name__ == "__main__":
    main()
