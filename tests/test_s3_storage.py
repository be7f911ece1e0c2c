"""Storage on S3: a DVC remote and `dataset.source=url` with an `s3://` archive, against a real
S3-compatible server (SeaweedFS, `s3_server` in conftest.py) on 127.0.0.1.

The DVC test clones the end-to-end `project` (after its `dvc repro`) as its author would push
it, pushes every output to the bucket, clones again as a teammate would and pulls. It shares
the project's DVC cache for the push (the clone's `--local` cache setting), and adds to it only
the regenerated sample that `data.dvc` points at: nothing the other tests read changes.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run
from test_download import make_uniri_like, uniri_params

from pipeline.errors import PipelineError
from pipeline.params import compose_params, dump_params
from pipeline.schema import parse_params
from pipeline.stages.download import run as download

pytestmark = pytest.mark.scaleout  # README "Scaling out"; `pytest -m scaleout`


def s3_env(env: dict, server: dict, secret: str | None = None) -> dict:
    """`env` with the keys of the team's bucket (as a user exports them)."""
    return {
        **env,
        "AWS_ACCESS_KEY_ID": server["key"],
        "AWS_SECRET_ACCESS_KEY": secret or server["secret"],
    }


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow  # ~30 s; make test-all and CI run it
def test_dvc_push_to_s3_and_pull_into_a_fresh_clone(project, s3_server, tmp_path):
    repo, state = project
    env = s3_env(state["env"], s3_server)
    author, teammate = tmp_path / "author", tmp_path / "teammate"
    run(["git", "clone", "-q", str(repo), str(author)], tmp_path, env)
    # the pipeline's results as the author commits them after `dvc repro`
    changed = subprocess.run(
        ["git", "diff", "HEAD", "--name-only"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "dvc.lock" in changed
    for rel in changed:
        shutil.copy2(repo / rel, author / rel)
    run(["dvc", "cache", "dir", "--local", str(repo / ".dvc" / "cache")], author, env)
    # the data data.dvc points at: the embedded sample as the committed default composes it
    default = tmp_path / "sample_params.yaml"
    default.write_text(dump_params(compose_params(["experiment=sample"], conf_dir=repo / "conf")))
    run(
        [sys.executable, "-m", "pipeline.stages.download", "--params", str(default)]
        + ["--out", "data/source"],
        author,
        env,
    )
    run(["dvc", "commit", "-f", "data.dvc"], author, env)
    # the README's commands for an S3-compatible server
    remote = f"s3://{s3_server['bucket']}/handball-dvc"
    run(["dvc", "remote", "add", "-d", "storage", remote], author, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3_server["endpoint"]], author, env)
    run(["git", "add", "-A"], author, env)
    run(["git", "commit", "-q", "-m", "pipeline results, S3 remote"], author, env)

    wrong = subprocess.run(
        ["dvc", "push"],
        cwd=author,
        env=s3_env(env, s3_server, secret="not-the-key"),
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0
    assert "forbidden" in (wrong.stdout + wrong.stderr).lower(), wrong.stderr[-2000:]

    pushed = run(["dvc", "push"], author, env)
    assert "pushed" in pushed.lower()
    assert "in sync" in run(["dvc", "status", "-c"], author, env)

    run(["git", "clone", "-q", str(author), str(teammate)], tmp_path, env)
    assert not (teammate / "models" / "cnn3d").exists()  # git has only DVC's pointers
    assert not (teammate / "data" / "source").exists()
    run(["dvc", "pull"], teammate, env)
    # what dvc.lock names, from the author's cache (the project's workspace is no reference:
    # later tests there, e.g. train_seeds, rewrite models/ outside DVC)
    run(["dvc", "checkout"], author, env)
    for out in ("data/source", "data/features", "models"):
        assert tree_digest(teammate / out) == tree_digest(author / out), out
    assert "in sync" in run(["dvc", "status", "-c"], teammate, env)
    assert "up to date" in run(["dvc", "status"], teammate, env).lower()


def test_url_source_reads_an_s3_archive(s3_server, tmp_path, in_tmp_root, tiny_params, monkeypatch):
    """`dataset.source=url` with `s3://bucket/key`: the endpoint and keys come from the usual
    AWS variables (AWS_ENDPOINT_URL for a server other than AWS)."""
    import s3fs

    src = make_uniri_like(tmp_path / "src")
    archive = Path(shutil.make_archive(str(tmp_path / "UNIRI-HBD"), "zip", src))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    bucket = s3fs.S3FileSystem(
        key=s3_server["key"],
        secret=s3_server["secret"],
        client_kwargs={"endpoint_url": s3_server["endpoint"]},
    )
    url = f"s3://{s3_server['bucket']}/archives/UNIRI-HBD.zip"
    bucket.put(str(archive), url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    with pytest.raises(PipelineError, match=r"could not be downloaded.*Forbidden"):
        download(parse_params(uniri_params(tiny_params, source="url", url=url, sha256=digest)))
    assert not (in_tmp_root / "data" / "raw").exists()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    # s3fs keeps one filesystem per set of arguments in a process, keys from the environment
    # included; a stage is a new process, this test is not
    s3fs.S3FileSystem.clear_instance_cache()
    manifest = download(
        parse_params(uniri_params(tiny_params, source="url", url=url, sha256=digest))
    )
    assert len(manifest) == 11
