"""The per-clip stages on a Dask distributed cluster (`dask.scheduler`): clean's probe, frames
and features on a real LocalCluster (two worker processes on 127.0.0.1) write the same bytes as
the local worker pool, on the generated sample at tiny size (its motion stream and augmented
copies included)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.schema import parse_params
from pipeline.schema.sections import Dask

pytestmark = pytest.mark.scaleout  # README "Scaling out"; `pytest -m scaleout`

distributed = pytest.importorskip("distributed")

OUTPUTS = ("data/clean", "data/frames", "data/features")


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for out in OUTPUTS
        for p in sorted((root / out).rglob("*"))
        if p.is_file()
    }


def per_clip_stages(params: dict) -> None:
    from pipeline.stages.clean import clean
    from pipeline.stages.features import run as extract_features
    from pipeline.stages.frames import run as extract_frames

    clean(parse_params(params))
    extract_frames(parse_params(params))
    extract_features(parse_params(params))


def local_cluster() -> distributed.LocalCluster:
    """Two single-threaded worker processes, as `dask worker` runs them on two machines."""
    return distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    )


@pytest.mark.slow  # ~40 s, which the default run cannot spare (it is at ~9 of its 10 min); CI runs it
def test_the_per_clip_stages_on_a_cluster_write_the_local_bytes(in_tmp_root, tiny_params, caplog):
    from pipeline.stages.download import run as download

    download(parse_params(tiny_params))
    per_clip_stages(tiny_params)  # dask.scheduler: null, the local pool
    local = digests(in_tmp_root)
    assert any(name.endswith("aug_features.npy") for name in local)
    for out in OUTPUTS:
        shutil.rmtree(in_tmp_root / out)

    with local_cluster() as cluster, distributed.Client(cluster) as watcher:
        # three clips per task: splits and tasks do not line up, and the last block is short
        dask = {**tiny_params["dask"], "scheduler": cluster.scheduler_address, "clips_per_task": 3}
        with distributed.get_task_stream(watcher) as tasks, caplog.at_level(logging.INFO):
            per_clip_stages({**tiny_params, "dask": dask})
    assert f"on the Dask cluster at {cluster.scheduler_address}" in caplog.text
    assert len({task["worker"] for task in tasks.data}) == 2  # the work was spread
    assert digests(in_tmp_root) == local


def test_a_worker_that_cannot_see_a_clip_stops_the_stage(tmp_path):
    """A clip this machine has but a worker cannot read (no shared volume) is an error, not a
    clip recorded as unreadable and dropped."""
    from pipeline.data.video import probe_and_hash
    from pipeline.parallel import cluster_map

    missing = tmp_path / "not-on-the-worker.avi"
    with (
        local_cluster() as cluster,
        distributed.Client(cluster) as client,
        pytest.raises(PipelineError, match="cannot read .*not-on-the-worker.avi.*shared"),
    ):
        list(cluster_map(client, probe_and_hash, [[(missing, str(missing))]], "probe clips"))


def test_an_unreachable_scheduler_names_the_key(tmp_path):
    from pipeline.data.video import probe_and_hash
    from pipeline.parallel import clip_map

    dask = Dask(scheduler="tcp://127.0.0.1:9", clips_per_task=4, connect_timeout_s=2.0)
    with pytest.raises(PipelineError, match="dask.scheduler='tcp://127.0.0.1:9'"):
        list(clip_map(probe_and_hash, [tmp_path], [tmp_path], "probe clips", 1, dask))


def test_the_local_pool_imports_nothing_from_dask(tmp_path):
    """dask.scheduler: null (the default) runs today's local pool without importing Dask."""
    clip = tmp_path / "missing.avi"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.parallel import clip_map\n"
        "from pipeline.data.video import probe_and_hash\n"
        "from pipeline.schema.sections import Dask\n"
        f"clips = [Path({str(clip)!r})]\n"
        "dask = Dask(scheduler=None, clips_per_task=1, connect_timeout_s=30.0)\n"
        "list(clip_map(probe_and_hash, clips, clips, 'probe clips', 1, dask))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
