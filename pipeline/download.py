"""Stage `download`: materialise the selected dataset as `<raw>/<class>/<clip>` plus a manifest.

Sources (`dataset.source`):
- `sample`: generate the embedded synthetic sample (deterministic from `dataset.sample.seed`);
- `folder`: copy a folder-per-class video collection from `dataset.path`
  (e.g. UNIRI-HBD's `actions/`), keeping only `dataset.classes` and `dataset.extensions`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.common import atomic_dir, resolve, stage_cli
from pipeline.sample_dataset import generate_sample

log = logging.getLogger(__name__)


def copy_folder_dataset(src: Path, out_dir: Path, classes: list[str], extensions: list[str]) -> list[dict]:
    if not src.is_dir():
        raise FileNotFoundError(f"dataset.path={src} is not a directory of <class>/<clip> folders")
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    missing = [c for c in classes if not (src / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"dataset.path={src} has no folder for classes {missing}")
    rows = []
    files = [(c, f) for c in classes for f in sorted((src / c).iterdir())
             if f.is_file() and f.suffix.lower() in exts]
    for label, f in tqdm(files, desc="copy clips", unit="clip"):
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out_dir / label / f.name)
        rows.append({"path": f"{label}/{f.name}", "label": label})
    return rows


def download(params: dict, target: Path | None = None) -> pd.DataFrame:
    """Write the raw dataset and `manifest.csv` atomically to `target` (default `paths.raw`)."""
    ds = params["dataset"]
    target = resolve(target or params["paths"]["raw"])
    with atomic_dir(target) as tmp:
        if ds["source"] == "sample":
            rows = generate_sample(tmp, ds["sample"], list(ds["classes"]))
        elif ds["source"] == "folder":
            rows = copy_folder_dataset(resolve(ds["path"]), tmp, list(ds["classes"]),
                                       list(ds.get("extensions", [".avi", ".mp4"])))
        else:
            raise ValueError(f"dataset.source={ds['source']!r} is not one of: sample, folder")
        if not rows:
            raise ValueError(f"dataset {ds['name']!r} produced no clips")
        manifest = pd.DataFrame(rows, columns=["path", "label"])
        manifest.to_csv(tmp / "manifest.csv", index=False)
    counts = manifest["label"].value_counts().to_dict()
    log.info("download: %d clips of %d classes in %s (%s)", len(manifest), len(counts), target,
             ", ".join(f"{k} {v}" for k, v in counts.items()))
    return manifest


def main(argv: list[str] | None = None) -> None:
    def out_option(parser):
        parser.add_argument("--out", default=None, type=Path,
                            help="write here instead of paths.raw (e.g. data/source for data.dvc)")

    stage_cli("download", __doc__.splitlines()[0], lambda p, a: download(p, a.out), argv,
              out_option)


if __name__ == "__main__":
    main()
