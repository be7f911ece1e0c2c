"""Which stages an experiment ran. An experiment's commit holds the outputs of every stage,
those of the stages it did not run included: `dvc exp run train@cnn3d` keeps frame_cnn's
outputs (and dvc.lock entry) from the commit it started from, or from the workspace. A
stage's outputs belong to the experiment when its dvc.lock entry agrees with the
experiment's params files, with its code (the files of its commit the stage reads) and with
the outputs of the stages it reads, which is what `dvc status` checks in a workspace.
"""

from __future__ import annotations

from functools import lru_cache

from pipeline.config import repo_root
from pipeline.errors import PipelineError

ABSENT = object()  # a key the params file does not hold (None is a value: `num_frames: null`)


def train_stage(model: str) -> str:
    """The name of `model`'s training stage in dvc.yaml (a `foreach` over the models)."""
    return f"train@{model}"


def dotted(tree: dict, key: str):
    """`tree`'s value at a dotted key (`models.cnn3d.train`), ABSENT when it has none."""
    value = tree
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return ABSENT
        value = value[part]
    return value


def stale_inputs(
    lock: dict, params_files: dict[str, dict], stage: str, files: dict[str, str] | None = None
) -> list[str]:
    """What of `stage`'s dvc.lock entry differs from the params files, from the md5 of the
    commit's `files` (path -> md5; code the stage reads) and from the lock's own outputs:
    `params.yaml: seed`, `pipeline/models/builders.py`, `data/frames`. An empty list: the
    stage's outputs are what it makes of them. A stage missing from the lock is stale as a
    whole."""
    entry = lock.get("stages", {}).get(stage)
    if entry is None:
        return [f"{stage} (not in dvc.lock)"]
    stale = []
    for file, values in entry.get("params", {}).items():
        for key, value in values.items():
            if dotted(params_files.get(file, {}), key) != value:
                stale.append(f"{file}: {key}")
    current = dict(files or {})
    current.update(
        (out["path"], out.get("md5"))
        for other in lock.get("stages", {}).values()
        for out in other.get("outs", [])
    )
    for dep in entry.get("deps", []):
        if dep["path"] in current and current[dep["path"]] != dep.get("md5"):
            stale.append(dep["path"])
    return sorted(set(stale))


@lru_cache(maxsize=256)
def _read_yaml(path: str, rev: str, repo: str) -> dict:
    import dvc.api
    from dvc.utils.serialize import parse_yaml  # as DVC reads them: 1e-05 is a number

    try:
        return parse_yaml(dvc.api.read(path, repo=repo, rev=rev), path) or {}
    except FileNotFoundError:
        return {}
    except Exception as exc:  # dvc raises several kinds for a rev it cannot resolve
        raise PipelineError(f"experiment {rev!r}: cannot read {path} ({exc})") from exc


@lru_cache(maxsize=256)
def _committed_md5s(rev: str, repo: str, paths: tuple[str, ...]) -> dict[str, str]:
    """DVC's hash of each of `paths` (the md5 of its bytes) that `rev`'s commit holds in Git;
    what Git does not hold there (DVC-tracked data, folders, files outside the repository)
    is left out."""
    import hashlib

    from dvc.scm import RevError, resolve_rev
    from scmrepo.git import Git

    with Git(repo) as scm:
        try:
            fs = scm.get_fs(resolve_rev(scm, rev))
        except RevError as exc:
            raise PipelineError(f"experiment {rev!r}: cannot resolve it ({exc})") from exc
        md5s = {}
        for path in paths:
            try:
                md5s[path] = hashlib.md5(fs.cat_file(path)).hexdigest()
            except (FileNotFoundError, IsADirectoryError):
                continue
    return md5s


def experiment_stale_inputs(rev: str, stage: str) -> list[str]:
    """`stale_inputs` of `stage` in experiment (or branch, tag, commit) `rev`, from its
    committed dvc.lock, params files and code."""
    repo = str(repo_root())
    lock = _read_yaml("dvc.lock", rev, repo)
    entry = lock.get("stages", {}).get(stage, {})
    params_files = {file: _read_yaml(file, rev, repo) for file in entry.get("params", {})}
    files = tuple(  # files hashed as their bytes (DVC 3); folders are other stages' outputs
        dep["path"]
        for dep in entry.get("deps", [])
        if dep.get("hash") == "md5" and "nfiles" not in dep
    )
    return stale_inputs(lock, params_files, stage, _committed_md5s(rev, repo, files))
