"""Stage `download`: materialise the selected dataset as `<raw>/<class>/<clip>` plus a manifest.

Sources (`dataset.source`):
- `sample`: generate the embedded synthetic sample (deterministic from `dataset.sample.seed`);
- `folder`: a folder-per-class video collection at `dataset.path` (e.g. UNIRI-HBD's `actions/`);
- `archive`: a local `.zip`/`.tar`/`.tar.gz` at `dataset.path`, unpacked safely;
- `url`: an archive at `dataset.url` (`https://`, `gs://`, `s3://`, ... through fsspec),
  checked against the required `dataset.sha256` before it is unpacked.

Class folders are matched to `dataset.classes` after normalising their names (case, `_`/space
to `-`), `dataset.aliases` (`shooting` -> `shot`) and `dataset.merge` (`running` -> `dribbling`);
folders of other classes are skipped and listed. `manifest.csv` has one row per clip: `path`
(inside the raw folder), `label`, and `source` (the path inside the dataset, for split files).
Nothing in the source is modified: clips are copied.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.config import dataset_name, resolve
from pipeline.data.sources import dataset_rows
from pipeline.errors import PipelineError
from pipeline.schema import Params
from pipeline.schema.sections import FootageDataset, SampleDataset
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


def download(ds: SampleDataset | FootageDataset, target: Path) -> pd.DataFrame:
    """Write the raw dataset and `manifest.csv` atomically to `target`."""
    target = resolve(target)
    with atomic_dir(target) as tmp:
        rows = dataset_rows(ds, tmp)
        if not rows:
            raise PipelineError(f"dataset {dataset_name(ds)!r} produced no clips")
        manifest = pd.DataFrame(rows, columns=["path", "label", "source"])
        manifest.to_csv(tmp / "manifest.csv", index=False)
        # the class list in its index order: dataset.classes, or the class folders found
        classes = list(ds.classes) if ds.classes else sorted(set(manifest["label"]))
        write_json_atomic(tmp / "classes.json", classes)
    counts = manifest["label"].value_counts().to_dict()
    log.info(
        "download: %d clips of %d classes in %s (%s)",
        len(manifest),
        len(counts),
        target,
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )
    return manifest


def run(config: Params, target: Path | None = None) -> pd.DataFrame:
    """The stage: `config.dataset` to `target` (default `paths.raw`)."""
    return download(config.dataset, target or config.paths.raw)


def main(argv: list[str] | None = None) -> None:
    def out_option(parser):
        parser.add_argument(
            "--out",
            default=None,
            type=Path,
            help="write here instead of paths.raw (e.g. data/source for data.dvc)",
        )

    stage_cli("download", __doc__.splitlines()[0], lambda p, a: run(p, a.out), argv, out_option)


if __name__ == "__main__":
    main()
