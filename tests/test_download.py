"""The download stage reads folders, archives and URLs into `<raw>/<class>/<clip>`, safely."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_numbered_video

from pipeline.data.archive import UnsafeArchive, safe_extract
from pipeline.errors import PipelineError
from pipeline.schema import InvalidConfig, parse_params
from pipeline.stages.download import run as download

CLASSES = ["passing", "shot", "jump-shot", "running", "dribbling"]


def uniri_params(tiny_params: dict, **dataset) -> dict:
    """tiny_params with the real conf/dataset/uniri_hbd.yaml as dataset, plus overrides."""
    from conftest import ROOT

    from pipeline.params import compose_params

    ds = compose_params(["dataset=uniri_hbd"], conf_dir=ROOT / "conf")["dataset"]
    return {**tiny_params, "dataset": {**ds, "classes": CLASSES, **dataset}}


def make_uniri_like(root: Path) -> Path:
    """A UNIRI-HBD-like tree with the folder-name variants real copies have."""
    actions = root / "UNIRI-HBD" / "actions"
    layout = {
        "Passing": 2,
        "Shooting": 2,
        "Jump_Shot": 2,
        "running": 1,
        "dribbling": 2,
        "crossing": 1,
    }
    for folder, n in layout.items():
        (actions / folder).mkdir(parents=True)
        for k in range(1, n + 1):
            write_numbered_video(actions / folder / f"{folder.lower()}_KS_{k}_act1.avi", 8)
    write_numbered_video(actions / "running" / "dribbling_KS_1_act1.avi", 8)  # name clash on merge
    write_numbered_video(actions / "Passing" / "pässe_ÄÖ_1_act2.avi", 8)  # non-ASCII name
    (actions / "Passing" / "notes.txt").write_text("annotator notes")
    (actions / "Passing" / "._passing_KS_1_act1.avi").write_bytes(b"macOS resource fork")
    return root


def test_folder_source_maps_aliases_merges_and_skips(tmp_path, in_tmp_root, tiny_params, caplog):
    src = make_uniri_like(tmp_path / "src")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    params = uniri_params(
        tiny_params,
        path=str(src),
        merge={"running": "dribbling"},
        classes=["passing", "shot", "jump-shot", "dribbling"],
    )
    manifest = download(parse_params(params))
    assert manifest["label"].value_counts().to_dict() == {
        "passing": 3,
        "shot": 2,
        "jump-shot": 2,
        "dribbling": 4,
    }
    assert "passing/pässe_ÄÖ_1_act2.avi" in set(manifest["path"])
    # the running clip whose name equals a dribbling clip gets a distinct name, not overwritten
    assert manifest["path"].is_unique and len(set(manifest["source"])) == len(manifest)
    for rel in manifest["path"]:
        assert (in_tmp_root / "data" / "raw" / rel).is_file()
    assert "crossing" in caplog.text  # skipped folder named
    assert "hidden or not dataset.extensions" in caplog.text
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # source untouched
    assert pd.read_csv(in_tmp_root / "data" / "raw" / "manifest.csv").equals(manifest)


def test_missing_class_is_named(tmp_path, in_tmp_root, tiny_params):
    src = make_uniri_like(tmp_path / "src")
    params = uniri_params(tiny_params, path=str(src), classes=["passing", "defence"])
    with pytest.raises(PipelineError, match=r"no clips for classes \['defence'\]"):
        download(parse_params(params))
    assert not (in_tmp_root / "data" / "raw").exists()  # nothing half-written


def test_bad_merge_target_is_refused(tmp_path, in_tmp_root, tiny_params):
    src = make_uniri_like(tmp_path / "src")
    params = uniri_params(tiny_params, path=str(src), merge={"running": "sprinting"})
    with pytest.raises(PipelineError, match="dataset.merge"):
        download(parse_params(params))


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_archive_source_unpacks_into_raw(tmp_path, in_tmp_root, tiny_params, suffix):
    src = make_uniri_like(tmp_path / "src")
    archive = Path(
        shutil.make_archive(
            str(tmp_path / "UNIRI-HBD"), "zip" if suffix == ".zip" else "gztar", src
        )
    )
    params = uniri_params(tiny_params, source="archive", path=str(archive))
    manifest = download(parse_params(params))
    assert len(manifest) == 11 and set(manifest["label"]) == set(CLASSES)
    raw = in_tmp_root / "data" / "raw"
    assert not (raw / ".unpacked").exists()
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        CLASSES + ["classes.json", "manifest.csv"]
    )
    assert json.loads((raw / "classes.json").read_text()) == CLASSES  # the configured order


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_archive_with_parent_traversal_is_refused_before_writing(
    tmp_path, in_tmp_root, tiny_params
):
    archive = write_zip(
        tmp_path / "evil.zip", {"actions/shot/a.avi": b"x" * 10, "../../escaped.txt": b"pwned"}
    )
    params = uniri_params(tiny_params, source="archive", path=str(archive))
    with pytest.raises(UnsafeArchive, match=r"\.\."):
        download(parse_params(params))
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (in_tmp_root / "data" / "raw").exists()


def test_archive_with_absolute_path_is_refused(tmp_path):
    archive = write_zip(tmp_path / "abs.zip", {"/etc/evil.avi": b"x"})
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="absolute"):
        safe_extract(archive, tmp_path / "out", max_bytes=10**6)
    assert not any((tmp_path / "out").iterdir())


def test_tar_with_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("actions/shot/clip.avi")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="link"):
        safe_extract(archive, tmp_path / "out", max_bytes=10**6)
    assert not any((tmp_path / "out").iterdir())


def test_archive_over_the_size_cap_is_refused(tmp_path):
    archive = write_zip(tmp_path / "big.zip", {"a/b.avi": b"\0" * 5000})
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchive, match="max_unpacked_gb"):
        safe_extract(archive, tmp_path / "out", max_bytes=4000)
    assert not any((tmp_path / "out").iterdir())


def test_zip_that_lies_about_its_size_fails_cleanly(tmp_path):
    """A header declaring fewer bytes than the entry holds ends in a clear error naming the
    archive, and no more than the cap is written."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a/b.avi", b"\1" * 5000)
    data = bytearray(buffer.getvalue())
    # patch the central directory's uncompressed size (offset 24 in the entry) down to 10
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24 : cd + 28] = (10).to_bytes(4, "little")
    archive = tmp_path / "liar.zip"
    archive.write_bytes(bytes(data))
    (tmp_path / "out").mkdir()
    with pytest.raises(PipelineError, match="liar.zip"):
        safe_extract(archive, tmp_path / "out", max_bytes=100)
    assert sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file()) <= 100


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving `tmp_path/www`."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_source_checks_sha256(tmp_path, in_tmp_root, tiny_params, http_server):
    www, base = http_server
    src = make_uniri_like(tmp_path / "src")
    archive = Path(shutil.make_archive(str(www / "UNIRI-HBD"), "zip", src))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{base}/UNIRI-HBD.zip"

    with pytest.raises(InvalidConfig, match="source='url' needs sha256"):
        download(parse_params(uniri_params(tiny_params, source="url", url=url, sha256=None)))
    with pytest.raises(PipelineError, match="refusing"):
        download(parse_params(uniri_params(tiny_params, source="url", url=url, sha256="0" * 64)))
    assert not (in_tmp_root / "data" / "raw").exists()

    manifest = download(
        parse_params(uniri_params(tiny_params, source="url", url=url, sha256=digest))
    )
    assert len(manifest) == 11
    with pytest.raises(PipelineError, match="could not be downloaded"):
        download(
            parse_params(
                uniri_params(tiny_params, source="url", url=f"{base}/absent.zip", sha256=digest)
            )
        )


def test_class_folders_are_the_classes_when_none_are_given(
    tmp_path, in_tmp_root, tiny_params, caplog
):
    """`dataset=folder` with no class list: the class folders (a level down, next to a folder
    without videos) become the classes, sorted, with names normalised and aliases applied;
    the list is logged and recorded for clean, frames and the models."""
    import logging

    from conftest import ROOT

    from pipeline.params import compose_params
    from pipeline.stages.clean import clean
    from pipeline.stages.frames import run as extract_frames

    season = tmp_path / "footage" / "season-1"
    for folder in ("Pass", "Shot_On_Goal", "blok"):
        (season / folder).mkdir(parents=True)
        for scene in range(6):
            write_numbered_video(season / folder / f"{folder}_S{scene}_act1.avi", 10)
    (season / "docs").mkdir()
    (season / "docs" / "protocol.txt").write_text("who filmed what")
    ds = compose_params(["dataset=folder"], conf_dir=ROOT / "conf")["dataset"]
    assert ds["classes"] is None  # the folder dataset's default
    params = {
        **tiny_params,
        "workers": 2,
        "dataset": {**ds, "path": str(tmp_path / "footage"), "aliases": {"blok": "block"}},
    }
    with caplog.at_level(logging.INFO):
        manifest = download(parse_params(params))
    found = ["block", "pass", "shot-on-goal"]
    assert sorted(set(manifest["label"])) == found and len(manifest) == 18
    assert "block, pass, shot-on-goal" in caplog.text
    assert json.loads((in_tmp_root / "data" / "raw" / "classes.json").read_text()) == found
    clean(parse_params(params))
    dataset = json.loads((in_tmp_root / "data" / "clean" / "dataset.json").read_text())
    assert dataset["classes"] == found
    extract_frames(parse_params(params))
    assert json.loads((in_tmp_root / "data" / "frames" / "classes.json").read_text()) == found


def test_a_folder_without_class_folders_names_the_keys_to_set(tmp_path, in_tmp_root, tiny_params):
    from conftest import ROOT

    from pipeline.params import compose_params

    (tmp_path / "flat").mkdir()
    write_numbered_video(tmp_path / "flat" / "clip_act1.avi", 10)
    ds = compose_params(["dataset=folder"], conf_dir=ROOT / "conf")["dataset"]
    params = {**tiny_params, "dataset": {**ds, "path": str(tmp_path / "flat")}}
    with pytest.raises(PipelineError, match="set dataset.classes, or dataset.subdir"):
        download(parse_params(params))


def test_a_dataset_without_a_name_is_named_after_its_folder_or_archive():
    from pipeline.config import dataset_name
    from pipeline.schema.sections import FootageDataset

    def named(name=None, source="folder", **where) -> str:
        fields = {"name": name, "source": source, "tracked": "data/source", "classes": None}
        return dataset_name(FootageDataset.model_validate({**fields, **where}))

    assert named("uniri_hbd", path="data/source") == "uniri_hbd"
    assert named(path="../shared/data/real/cricket_shots/") == "cricket_shots"
    assert named(source="archive", path="/dl/UNIRI-HBD.tar.gz") == "UNIRI-HBD"
    assert named(source="url", url="https://x.org/a/clips.zip?sig=1", sha256="0" * 64) == "clips"
