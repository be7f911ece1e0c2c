"""Where a dataset's clips come from: class folders in a folder, an archive or a URL, matched to
the configured classes (names normalised, aliases and merges applied), copied with a manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from pipeline.config import resolve
from pipeline.data.archive import copy_stream, is_archive, safe_extract
from pipeline.data.sample import generate_sample
from pipeline.errors import PipelineError
from pipeline.schema.sections import DatasetBase, FootageDataset, SampleDataset

log = logging.getLogger(__name__)


IGNORED_DIRS = {"__MACOSX", ".git", ".dvc"}


def normalise_name(name: str) -> str:
    """`Jump_Shot` / `jump shot` / `JUMP-SHOT` -> `jump-shot`."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def folder_class_name(folder: str, ds: DatasetBase) -> str:
    """A class folder's name as a class: normalised, then `dataset.aliases` and `merge`."""
    name = normalise_name(folder)
    aliases = {normalise_name(k): v for k, v in ds.aliases.items()}
    name = aliases.get(name, name)
    return ds.merge.get(name, name)


def class_of_folder(folder: str, ds: DatasetBase) -> str | None:
    """The class a folder's clips belong to, or None when the dataset does not keep it."""
    name = folder_class_name(folder, ds)
    return name if name in ds.classes else None


def video_extensions(ds: DatasetBase) -> set[str]:
    if not ds.extensions:
        raise PipelineError("dataset.extensions is empty: list the video file endings to read")
    return {e.lower() for e in ds.extensions}


def class_root_candidates(root: Path, ds: DatasetBase) -> Iterator[Path]:
    """Where the class folders may sit: `dataset.subdir` (which must exist), else `root` and
    the folders under it, shallowest first, down to 5 levels."""
    if ds.subdir:
        chosen = root / ds.subdir
        if not chosen.is_dir():
            raise PipelineError(f"dataset.subdir={ds.subdir!r} is not a folder in {root}")
        yield chosen
        return
    level = [root]
    for _ in range(5):
        yield from level
        level = sorted(
            d for f in level for d in f.iterdir() if d.is_dir() and d.name not in IGNORED_DIRS
        )


def discover_classes(root: Path, ds: DatasetBase) -> list[str]:
    """The classes of a collection whose `dataset.classes` is null: the names (as
    `folder_class_name` makes them, sorted) of the sub-folders holding videos in
    `dataset.subdir`, else in the shallowest folder under `root` with two or more such."""
    exts = video_extensions(ds)

    def holds_videos(folder: Path) -> bool:
        return any(f.is_file() and f.suffix.lower() in exts for f in folder.rglob("*"))

    def class_folders(folder: Path) -> list[Path]:
        return [
            d
            for d in sorted(folder.iterdir())
            if d.is_dir() and d.name not in IGNORED_DIRS and not d.name.startswith(".")
        ]

    for folder in class_root_candidates(root, ds):
        found = [d for d in class_folders(folder) if holds_videos(d)]
        if len(found) >= 2 or (ds.subdir and found):
            classes = sorted({folder_class_name(d.name, ds) for d in found})
            log.info(
                "download: dataset.classes is null, so the class folders of %s are the classes: %s",
                folder,
                ", ".join(classes),
            )
            return classes
    raise PipelineError(
        f"no folder under {root} has two or more sub-folders of videos "
        f"({', '.join(sorted(exts))}) to take as classes; set dataset.classes, or "
        f"dataset.subdir to the folder holding the class folders"
    )


def check_class_config(ds: DatasetBase) -> None:
    classes = list(ds.classes or [])
    if len(set(classes)) != len(classes) or not classes:
        raise PipelineError(f"dataset.classes={classes} must be a non-empty list without repeats")
    bad = {k: v for k, v in ds.merge.items() if v not in classes}
    if bad:
        raise PipelineError(
            f"dataset.merge maps into classes that are not in dataset.classes: {bad}"
        )


def find_class_root(root: Path, ds: DatasetBase) -> Path:
    """The folder whose sub-folders are the classes: `dataset.subdir`, else the shallowest
    folder under `root` that has a sub-folder for most of the kept classes."""
    need = max(1, (len(ds.classes) + 1) // 2)
    for folder in class_root_candidates(root, ds):
        if ds.subdir:
            return folder
        subdirs = [d for d in folder.iterdir() if d.is_dir()]
        if len({class_of_folder(d.name, ds) for d in subdirs} - {None}) >= need:
            return folder
    raise PipelineError(
        f"no folder under {root} has sub-folders named after the classes {ds.classes} "
        f"(aliases {ds.aliases}); set dataset.subdir to the folder that does"
    )


def collect_clips(root: Path, ds: DatasetBase) -> list[tuple[Path, str]]:
    """(file, label) for every video of a kept class under `root`, in a stable order."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.path={root} is not a directory of <class>/<clip> folders")
    if ds.classes is None:  # found from the class folders
        ds = ds.model_copy(update={"classes": discover_classes(root, ds)})
    check_class_config(ds)
    class_root = find_class_root(root, ds)
    exts = video_extensions(ds)
    clips, skipped_folders, skipped_files = [], [], Counter()
    for folder in sorted(d for d in class_root.iterdir() if d.is_dir()):
        label = class_of_folder(folder.name, ds)
        if label is None:
            if folder.name not in IGNORED_DIRS:
                skipped_folders.append(folder.name)
            continue
        for f in sorted(folder.rglob("*")):
            if not f.is_file() or f.is_symlink():
                continue
            if f.name.startswith(".") or f.suffix.lower() not in exts:
                skipped_files[f.suffix.lower() or f.name] += 1
            else:
                clips.append((f, label))
    if skipped_folders:
        log.warning(
            "download: skipped folders that are not in dataset.classes: %s",
            ", ".join(skipped_folders),
        )
    if skipped_files:
        log.warning(
            "download: skipped %d files that are hidden or not dataset.extensions (%s)",
            sum(skipped_files.values()),
            ", ".join(f"{k} x{v}" for k, v in skipped_files.most_common(5)),
        )
    found = {label for _, label in clips}
    missing = [c for c in ds.classes if c not in found]
    if missing:
        folders = sorted(d.name for d in class_root.iterdir() if d.is_dir())
        raise PipelineError(
            f"no clips for classes {missing} in {class_root} (folders: {folders});"
            f" add dataset.aliases for their folder names or drop them from "
            f"dataset.classes"
        )
    return clips


def place_clips(clips: list[tuple[Path, str]], root: Path, out_dir: Path, move: bool) -> list[dict]:
    """Copy (or move, for files we unpacked ourselves) clips to `out_dir/<label>/<name>`."""
    rows, taken = [], set()
    for src, label in tqdm(clips, desc="move clips" if move else "copy clips", unit="clip"):
        rel = src.relative_to(root).as_posix()
        name, k = src.name, 1
        while (label, name) in taken:  # merged classes or nested folders with equal file names
            name = "__".join(src.relative_to(root).parts[-2:])
            name = name if k == 1 else f"{Path(name).stem}__{k}{src.suffix}"
            k += 1
        taken.add((label, name))
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        dest = out_dir / label / name
        if move:
            os.replace(src, dest)
        else:
            shutil.copy2(src, dest)
        rows.append({"path": f"{label}/{name}", "label": label, "source": rel})
    return rows


def fetch_url(url: str, sha256: str | None, dest_dir: Path) -> Path:
    """Stream `url` into `dest_dir` while hashing it; refuse a missing or different sha256."""
    if not sha256:
        raise PipelineError(
            f"dataset.sha256 is required for url sources ({url}): pin the "
            f"archive's content (sha256sum ARCHIVE)"
        )
    import fsspec

    name = Path(url.split("?", 1)[0].rstrip("/")).name or "archive"
    dest = dest_dir / name
    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb") as src, open(dest, "wb") as out:
            size = getattr(src, "size", None)
            with tqdm(total=size, desc=f"download {name}", unit="B", unit_scale=True) as bar:
                copy_stream(src, out, lambda chunk: (digest.update(chunk), bar.update(len(chunk))))
    except ImportError as exc:
        raise PipelineError(
            f"dataset.url={url}: {exc}. Install the matching extra, e.g. "
            f"`pip install -e '.[gs]'` or `'.[s3]'`"
        ) from exc
    except (OSError, ValueError) as exc:
        raise PipelineError(f"dataset.url={url} could not be downloaded: {exc}") from exc
    if digest.hexdigest() != sha256.lower():
        raise PipelineError(
            f"dataset.url={url} has sha256 {digest.hexdigest()}, but "
            f"dataset.sha256={sha256}: refusing to use it"
        )
    return dest


def unpack_and_collect(archive: Path, ds: FootageDataset, tmp: Path) -> list[dict]:
    if not is_archive(archive):
        raise PipelineError(
            f"{archive} is not a .zip/.tar/.tar.gz archive (dataset.source={ds.source})"
        )
    unpacked = tmp / ".unpacked"
    unpacked.mkdir()
    safe_extract(archive, unpacked, int(ds.max_unpacked_gb * 1e9))
    rows = place_clips(collect_clips(unpacked, ds), unpacked, tmp, move=True)
    shutil.rmtree(unpacked)
    return rows


def dataset_rows(ds: SampleDataset | FootageDataset, tmp: Path) -> list[dict]:
    """The clips of `ds` placed in `tmp` (generated, copied, unpacked or fetched), a row each."""
    if isinstance(ds, SampleDataset):
        return [{**r, "source": r["path"]} for r in generate_sample(tmp, ds.sample, ds.classes)]
    if ds.source == "folder":
        root = resolve(ds.path)
        return place_clips(collect_clips(root, ds), root, tmp, move=False)
    if ds.source == "archive":
        archive = resolve(ds.path)
        if not archive.is_file():
            raise FileNotFoundError(f"dataset.path={archive}: archive not found")
        return unpack_and_collect(archive, ds, tmp)
    fetched = tmp / ".fetched"
    fetched.mkdir()
    rows = unpack_and_collect(fetch_url(ds.url, ds.sha256, fetched), ds, tmp)
    shutil.rmtree(fetched)
    return rows
