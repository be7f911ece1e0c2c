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
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.config import SPLITS, dataset_name, resolve
from pipeline.data.splits import (
    apply_split_file,
    check_class_minimum,
    drop_reason,
    group_of,
    mark_duplicates,
    split_by_group,
    warn_missing_test_classes,
)
from pipeline.data.video import probe_and_hash
from pipeline.errors import PipelineError
from pipeline.parallel import clip_map
from pipeline.schema import Params
from pipeline.schema.sections import Clean, DatasetBase
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


def clean(params: Params) -> pd.DataFrame:
    """Probe every downloaded clip, quarantine the unusable ones, split the rest by recording
    group (or as `dataset.split_file` says) and write `paths.clean`: read the manifest ->
    probe -> split -> describe the dataset -> write. Returns the split table."""
    cfg, ds = params.clean, params.dataset
    raw = resolve(params.paths.raw)
    manifest, classes = read_manifest(raw, ds.classes)
    clips = [raw / p for p in manifest["path"]]
    infos = list(clip_map(probe_and_hash, clips, clips, "probe clips", params.workers, params.dask))
    probe = probe_table(manifest, infos, cfg)
    with atomic_dir(resolve(params.paths.clean)) as tmp:
        if ds.split_file:
            probe = apply_split_file(probe, resolve(ds.split_file), classes, tmp)
        usable = probe[probe["status"] == "ok"].copy()
        quarantine = probe[probe["status"] == "dropped"]
        check_class_minimum(usable, classes, cfg.min_clips_per_class, quarantine)
        usable["split"] = assigned_splits(usable, cfg, ds.split_file is not None, params.seed)
        for rec in quarantine.itertuples():
            log.warning("quarantined %s: %s", rec.path, rec.reason)
        splits = usable[["path", "label", "group", "split", "frames", "fps", "width", "height"]]
        warn_missing_test_classes(splits, classes)
        summary = dataset_record(ds, classes, probe, usable, quarantine, splits)
        probe.drop(columns=["group"]).to_csv(tmp / "probe.csv", index=False)
        quarantine[["path", "label", "reason_code", "reason"]].to_csv(
            tmp / "quarantine.csv", index=False
        )
        splits.to_csv(tmp / "splits.csv", index=False)
        write_json_atomic(tmp / "dataset.json", summary)
    log.info(
        "clean: %d of %d clips usable (%d quarantined%s); split train %d / val %d / test %d "
        "clips; dataset hash %s",
        len(usable),
        len(probe),
        len(quarantine),
        "".join(f", {v} {k}" for k, v in summary["quarantined_by_reason"].items()),
        *(int((splits["split"] == s).sum()) for s in SPLITS),
        summary["dataset_hash"][:12],
    )
    return splits


def read_manifest(raw: Path, configured: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """The download stage's manifest (path, label, source per clip) and the class list:
    `dataset.classes` (`configured`), or (when it is null) the class folders the download
    stage found."""
    manifest_path = raw / "manifest.csv"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run the download stage first")
    if configured:
        classes = list(configured)
    elif (raw / "classes.json").is_file():
        classes = json.loads((raw / "classes.json").read_text())
    else:
        raise FileNotFoundError(f"{raw / 'classes.json'} not found: rerun the download stage")
    manifest = pd.read_csv(manifest_path, dtype={"path": str, "label": str})
    if "source" not in manifest:
        manifest["source"] = manifest["path"]
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise PipelineError(f"{manifest_path} has labels not in dataset.classes: {unknown}")
    return manifest, classes


def probe_table(manifest: pd.DataFrame, infos: list[dict], cfg: Clean) -> pd.DataFrame:
    """The manifest with each clip's probe (frames, fps, size, hash), why it is unusable if
    it is (`status` dropped, `reason`), duplicates marked, and its recording group."""
    probe = pd.concat([manifest.reset_index(drop=True), pd.DataFrame(infos)], axis=1)
    reasons = [drop_reason(info, cfg) for info in infos]
    probe["reason_code"] = [code for code, _ in reasons]
    probe["reason"] = [text for _, text in reasons]
    probe["status"] = np.where(probe["reason_code"] == "", "ok", "dropped")
    probe = mark_duplicates(probe)
    probe["group"] = [group_of(p, cfg.group_pattern) for p in probe["path"]]
    return probe


def assigned_splits(usable: pd.DataFrame, cfg: Clean, from_file: bool, seed: int) -> pd.Series:
    """Each usable clip's split: the split file's (`from_file`; warning when it puts one
    recording group in more than one split), else a random split of the recording groups."""
    if not from_file:
        return split_by_group(usable, cfg.val_fraction, cfg.test_fraction, seed)
    leaks = usable.groupby("group")["split"].nunique()
    if (leaks > 1).any():
        log.warning(
            "split file puts %d recording groups in more than one split (e.g. "
            "%s): scores may be optimistic",
            int((leaks > 1).sum()),
            ", ".join(leaks.index[leaks > 1][:3]),
        )
    return usable["split"]


def dataset_record(ds: DatasetBase, classes, probe, usable, quarantine, splits) -> dict:
    """`dataset.json`: the dataset's name, classes, content and split hashes (scores and
    champions compare only on the same data and split), counts and where the split came from."""
    dataset_hash = hashlib.sha256(
        "".join(
            f"{p}\t{label}\t{h}\n"
            for p, label, h in sorted(zip(usable["path"], usable["label"], usable["sha256"]))
        ).encode()
    ).hexdigest()
    split_hash = hashlib.sha256(
        "".join(f"{p}\t{s}\n" for p, s in sorted(zip(splits["path"], splits["split"]))).encode()
    ).hexdigest()
    return {
        "name": dataset_name(ds),
        "classes": classes,
        "dataset_hash": dataset_hash,
        "split_hash": split_hash,
        "clips": int(len(probe)),
        "usable": int(len(usable)),
        "quarantined": int(len(quarantine)),
        "quarantined_by_reason": {
            k: int(v) for k, v in quarantine["reason_code"].value_counts().items()
        },
        "split_source": "split_file" if ds.split_file else "grouped_random",
        "counts": {
            s: {c: int(((splits["split"] == s) & (splits["label"] == c)).sum()) for c in classes}
            for s in SPLITS
        },
    }


def main(argv: list[str] | None = None) -> None:
    stage_cli("clean", __doc__.splitlines()[0], lambda p, a: clean(p), argv)


if __name__ == "__main__":
    main()
