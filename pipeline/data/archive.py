"""Safe unpacking of dataset archives (`.zip`, `.tar`, `.tar.gz`/`.tgz`, `.tar.bz2`, `.tar.xz`).

Every entry is checked before anything is written: absolute paths, `..` components, links
(symbolic or hard), device files and archives whose total unpacked size exceeds a cap are
refused with a message naming the entry. Files are then streamed out one by one with the
byte count enforced again while writing (a zip header may lie about sizes), so nothing lands
outside the target directory and a hostile archive cannot fill the disk.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from pipeline.errors import PipelineError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class UnsafeArchive(PipelineError):
    """The archive holds an entry that could write outside the target or exhaust the disk."""


@dataclass
class Entry:
    name: str  # path inside the archive, '/'-separated
    size: int  # declared uncompressed size
    is_dir: bool
    open: Callable[[], IO[bytes]]


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_relative_path(name: str, archive: Path) -> PurePosixPath:
    """The entry's path as a relative path with no `..`; raises UnsafeArchive otherwise."""
    posix = name.replace("\\", "/")
    path = PurePosixPath(posix)
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise UnsafeArchive(f"{archive}: entry {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"{archive}: entry {name!r} points outside the target (`..`)")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath()


def _zip_entries(zf: zipfile.ZipFile, archive: Path) -> Iterator[Entry]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeArchive(f"{archive}: entry {info.filename!r} is a symbolic link")
        yield Entry(info.filename, info.file_size, info.is_dir(), lambda info=info: zf.open(info))


def _tar_entries(tf: tarfile.TarFile, archive: Path) -> Iterator[Entry]:
    for member in tf.getmembers():
        if member.issym() or member.islnk():
            raise UnsafeArchive(
                f"{archive}: entry {member.name!r} is a link (to {member.linkname!r})"
            )
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"{archive}: entry {member.name!r} is not a regular file")
        yield Entry(
            member.name, member.size, member.isdir(), lambda member=member: tf.extractfile(member)
        )


def _open_archive(archive: Path):
    if archive.name.lower().endswith(".zip"):
        return zipfile.ZipFile(archive), _zip_entries
    try:
        return tarfile.open(archive, mode="r:*"), _tar_entries
    except tarfile.TarError as exc:
        raise PipelineError(f"{archive} is not a readable tar archive: {exc}") from exc


def safe_extract(archive: str | Path, target: str | Path, max_bytes: int) -> int:
    """Unpack `archive` into the existing directory `target`; returns the bytes written.

    Raises UnsafeArchive (nothing written) for absolute paths, `..`, links, special files or
    a declared total above `max_bytes`; raises it mid-way if the real bytes exceed the cap.
    """
    archive, target = Path(archive), Path(target).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"archive {archive} not found")
    try:
        handle, entries_of = _open_archive(archive)
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{archive} is not a readable zip archive: {exc}") from exc
    with handle:
        entries = list(entries_of(handle, archive))
        plan = [(safe_relative_path(e.name, archive), e) for e in entries]
        declared = sum(e.size for _, e in plan if not e.is_dir)
        if declared > max_bytes:
            raise UnsafeArchive(
                f"{archive} unpacks to {declared / 1e9:.2f} GB, more than "
                f"dataset.max_unpacked_gb={max_bytes / 1e9:g}"
            )
        written = 0

        def count(chunk: bytes) -> None:  # runs before each chunk is written
            nonlocal written
            written += len(chunk)
            if written > max_bytes:
                raise UnsafeArchive(
                    f"{archive}: unpacked bytes exceed dataset.max_unpacked_gb="
                    f"{max_bytes / 1e9:g} (at entry {entry.name!r})"
                )

        for rel, entry in tqdm(plan, desc=f"unpack {archive.name}", unit="file"):
            dest = target.joinpath(*rel.parts) if rel.parts else target
            if target not in (dest, *dest.parents):  # belt and braces after the checks above
                raise UnsafeArchive(f"{archive}: entry {entry.name!r} resolves outside {target}")
            if entry.is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                raise UnsafeArchive(f"{archive}: entry {entry.name!r} appears twice")
            try:
                with entry.open() as src, open(dest, "xb") as out:
                    copy_stream(src, out, count)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
                raise PipelineError(f"{archive} is corrupt at entry {entry.name!r}: {exc}") from exc
    return written


def copy_stream(src: IO[bytes], dest: IO[bytes], on_chunk: Callable[[bytes], None]) -> None:
    """Copy a binary stream in 1 MiB chunks, calling `on_chunk` on each (hashing, progress)."""
    while chunk := src.read(1 << 20):
        on_chunk(chunk)
        dest.write(chunk)
