"""Which clips are usable and where each goes: duplicates, label conflicts, the split by
recording group (or a given split file), class minimums.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import SPLITS
from pipeline.errors import PipelineError
from pipeline.schema.sections import Clean

log = logging.getLogger(__name__)

MAX_LISTED_CLIPS = 20  # clips listed in an error message


def drop_reason(info: dict, cfg: Clean) -> tuple[str, str]:
    """(reason code, human-readable reason) for an unusable clip; ("", "") when usable."""
    if info["error"]:
        return ("empty" if info["error"].startswith("empty") else "unreadable"), info["error"]
    if info["frames"] < cfg.min_frames:
        return "too_few_frames", f"{info['frames']} frames < clean.min_frames={cfg.min_frames}"
    if info["fps"] > 0 and info["duration_s"] < cfg.min_duration_s:
        return "too_short", (
            f"{info['duration_s']} s < clean.min_duration_s={cfg.min_duration_s:g}"
        )
    if info["width"] < cfg.min_width or info["height"] < cfg.min_height:
        return "too_small", (
            f"{info['width']}x{info['height']} smaller than "
            f"clean.min_width x min_height={cfg.min_width}x{cfg.min_height}"
        )
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
                    "dropped",
                    "label_conflict",
                    f"identical bytes filed under classes {labels} (also {others})",
                )
        else:
            first = copies["path"].iloc[0]
            for idx in copies.index[1:]:
                probe.loc[idx, ["status", "reason_code", "reason"]] = (
                    "dropped",
                    "duplicate",
                    f"byte-identical to {first}",
                )
    return probe


def group_of(path: str, pattern: str) -> str:
    """The recording a clip was cut from: the named group `group` of `pattern` on the stem."""
    stem = Path(path).stem
    match = re.match(pattern, stem)
    return match.group("group") if match else stem


def split_by_group(
    clips: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
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
            log.warning(
                "class %r has only %d recording group(s): %s",
                label,
                n,
                "no validation or test clips" if n == 1 else "no validation clips",
            )
        for i, group in enumerate(groups):
            assignment[group] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return clips["group"].map(assignment)


def apply_split_file(
    usable: pd.DataFrame, split_file: Path, classes: list[str], tmp: Path
) -> pd.DataFrame:
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
        raise PipelineError(
            f"dataset.split_file={split_file} lacks columns {sorted(missing)} "
            f"(needs clip, label, split)"
        )
    bad_split = sorted(set(listed["split"]) - set(SPLITS))
    bad_label = sorted(set(listed["label"]) - set(classes))
    if bad_split:
        raise PipelineError(
            f"dataset.split_file={split_file}: split values {bad_split} are not train/val/test"
        )
    if bad_label:  # classes not selected in dataset.classes: not an error
        log.info(
            "split file: ignoring %d rows of classes not in dataset.classes (%s)",
            int((~listed["label"].isin(classes)).sum()),
            ", ".join(bad_label),
        )
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
                "dropped",
                "label_conflict",
                f"dataset.split_file labels it {rec.label}, its folder says {usable.at[idx, 'label']}",
            )
        else:
            usable.at[idx, "split"] = rec.split
    unlisted = (usable["split"] == "") & (usable["status"] == "ok")
    usable.loc[unlisted, ["status", "reason_code", "reason"]] = (
        "dropped",
        "not_in_split_file",
        f"not listed in {split_file.name}",
    )
    unmatched = listed.loc[~listed.index.isin(matched)]
    unmatched.to_csv(tmp / "split_file_unmatched.csv", index=False)
    if len(unmatched):
        log.warning(
            "split file: %d listed clips are not in the dataset (e.g. %s); see "
            "split_file_unmatched.csv",
            len(unmatched),
            ", ".join(unmatched["clip"][:5]),
        )
    if unlisted.any():
        log.warning(
            "split file: %d clips of the dataset are not listed and are left out",
            int(unlisted.sum()),
        )
    return usable


def check_class_minimum(
    usable: pd.DataFrame, classes: list[str], minimum: int, dropped: pd.DataFrame | None = None
) -> None:
    """Stop when a class has fewer than `minimum` usable clips, naming the class and listing
    its clips that were left out (`dropped`: path, label, reason) with the reason for each:
    the stage fails, so no quarantine report is written for the user to read."""
    counts = usable["label"].value_counts()
    short = {c: int(counts.get(c, 0)) for c in classes if counts.get(c, 0) < minimum}
    if not short:
        return
    left_out = []
    if dropped is not None:
        for rec in dropped[dropped["label"].isin(list(short))].itertuples():
            left_out.append(f"  {rec.path}: {rec.reason}")
    shown = left_out[:MAX_LISTED_CLIPS]
    if len(left_out) > len(shown):
        shown.append(f"  ... and {len(left_out) - len(shown)} more")
    raise PipelineError(
        f"classes below clean.min_clips_per_class={minimum} usable clips: {short}. Add "
        f"clips, merge the class (dataset.merge) or drop it from dataset.classes. "
        + (
            "Clips of these classes left out:\n" + "\n".join(shown)
            if shown
            else "None of their clips was left out: the source has too few."
        )
    )


def warn_missing_test_classes(splits: pd.DataFrame, classes: list[str]) -> None:
    for split in ("test", "val"):
        absent = [
            c for c in classes if not ((splits["split"] == split) & (splits["label"] == c)).any()
        ]
        if absent:
            log.warning(
                "no %s clips for classes %s: their %s scores will be undefined",
                split,
                absent,
                split,
            )
