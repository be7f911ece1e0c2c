"""Multi-worker training (`distribute=multi_worker`, MultiWorkerMirroredStrategy with TF_CONFIG):
two worker processes on 127.0.0.1 train a model together through the train stage's own command
line, each in its own copy of the workspace (as two pods would), and a third process trains the
same global batches alone (a cluster of one). Dropout is off, so the three compute the same
steps and differ only in the order of float sums (the all-reduce; BatchNorm statistics are
synchronised across workers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, TINY, free_port, run

from pipeline.params import compose_params, dump_params

pytestmark = pytest.mark.scaleout  # README "Scaling out"; `pytest -m scaleout`

NO_DROPOUT = ["models.cnn_gru.dropout=0", "models.cnn3d.head.dropout=[0,0,0]"]
# stated tolerance against the one-process run: weights within 1e-3, probabilities within 1e-2
WEIGHT_TOLERANCE, PROBABILITY_TOLERANCE = 1e-3, 1e-2


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny sample's cached frames and features, made by the stages' own commands."""
    root = tmp_path_factory.mktemp("tiny-data")
    (root / "params.yaml").write_text(dump_params(compose_params(TINY, conf_dir=ROOT / "conf")))
    env = {**os.environ, "DVC_ROOT": str(root)}
    for stage in ("download", "clean", "frames", "features"):
        run([sys.executable, "-m", f"pipeline.stages.{stage}"], root, env)
    return root / "data"


def workspace(folder: Path, data: Path, strategy: str = "multi_worker") -> Path:
    folder.mkdir()
    shutil.copytree(data, folder / "data")
    overrides = TINY + [f"distribute={strategy}"] + NO_DROPOUT
    (folder / "params.yaml").write_text(
        dump_params(compose_params(overrides, conf_dir=ROOT / "conf"))
    )
    return folder


def train_in_cluster(folders: list[Path], model: str) -> list[str]:
    """Run the train stage in every folder at once, as the workers of one cluster; the logs."""
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in folders]}
    procs = []
    for index, folder in enumerate(folders):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "DVC_ROOT": str(folder), "TF_CONFIG": json.dumps(tf_config)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pipeline.stages.train", "--model", model],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return logs


def weights_of(path: Path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path).get_weights()


@pytest.mark.slow  # ~30 s per model; CI runs it (make test-all)
@pytest.mark.parametrize("model", ["cnn_gru", "cnn3d"])
def test_two_workers_train_in_step_and_match_one_process(model, tiny_data, tmp_path):
    chief, worker, alone = (workspace(tmp_path / n, tiny_data) for n in ("w0", "w1", "alone"))
    logs = train_in_cluster([chief, worker], model)
    assert all("2 replicas in sync" in log for log in logs)
    digests = [re.findall(r"trained weights sha256 (\w+)", log) for log in logs]
    assert digests[0] and digests[0] == digests[1]  # the same weights on both workers

    # only the chief wrote outputs and logged to MLflow; the worker's copy is as it was
    assert sorted(p.name for p in worker.iterdir()) == ["data", "params.yaml"]
    for out in (f"models/{model}/model.keras", f"metrics/{model}.json", "mlflow.db"):
        assert (chief / out).is_file(), out

    (alone_log,) = train_in_cluster([alone], model)
    assert "1 replicas in sync" in alone_log
    pairs = zip(
        weights_of(chief / "models" / model / "model.keras"),
        weights_of(alone / "models" / model / "model.keras"),
        strict=True,
    )
    assert max(float(np.abs(a - b).max()) for a, b in pairs) < WEIGHT_TOLERANCE
    two, one = (pd.read_csv(f / "reports" / model / "predictions.csv") for f in (chief, alone))
    assert (two["predicted"] == one["predicted"]).all()
    assert np.abs(two["confidence"] - one["confidence"]).max() < PROBABILITY_TOLERANCE
    scores = [json.loads((f / "metrics" / f"{model}.json").read_text()) for f in (chief, alone)]
    assert scores[0]["macro_f1"] == scores[1]["macro_f1"]
    assert scores[0]["val_macro_f1"] == scores[1]["val_macro_f1"]


@pytest.mark.slow  # ~20 s; CI runs it (make test-all)
def test_mirrored_trains_with_keras_fit_on_the_devices_here(tiny_data, tmp_path):
    """`distribute=mirrored`: Keras `fit` under MirroredStrategy (one replica on this CPU; one
    per GPU elsewhere), synchronised BatchNorm, outputs written as without a strategy."""
    folder = workspace(tmp_path / "mirrored", tiny_data, strategy="mirrored")
    env = {**os.environ, "DVC_ROOT": str(folder)}
    env.pop("TF_CONFIG", None)
    log = run([sys.executable, "-m", "pipeline.stages.train", "--model", "cnn3d"], folder, env)
    assert "distribute.strategy=mirrored: 1 replicas in sync" in log
    assert "trained weights sha256" in log
    metrics = json.loads((folder / "metrics" / "cnn3d.json").read_text())
    assert metrics["epochs"] >= 1 and 0 <= metrics["macro_f1"] <= 1
    assert (folder / "models" / "cnn3d" / "model.keras").is_file()


def test_multi_worker_without_tf_config_says_what_is_missing(tmp_path, monkeypatch):
    from pipeline.errors import PipelineError
    from pipeline.models.distributed import training_strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    params = compose_params(TINY + ["distribute=multi_worker"], conf_dir=ROOT / "conf")
    with pytest.raises(PipelineError, match="needs TF_CONFIG"):
        training_strategy(params["distribute"]["strategy"])


def test_every_worker_draws_the_same_global_batches_with_class_weights():
    from pipeline.models.distributed import global_batches

    x = {"features": np.arange(10.0)[:, None], "mask": np.ones((10, 1), bool)}
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    fit_data = {"x": x, "y": y, "batch_size": 4, "class_weight": {0: 0.5, 1: 1.0, 2: 3.0}}
    epoch = list(global_batches(fit_data, epoch=0, seed=7))
    assert [len(b[1]) for b in epoch] == [4, 4, 2]
    seen = np.concatenate([b[0]["features"][:, 0] for b in epoch])
    assert sorted(seen) == list(range(10))  # every clip once
    for xb, yb, wb in epoch:
        assert np.array_equal(y[xb["features"][:, 0].astype(int)], yb)
        assert np.array_equal(wb, [fit_data["class_weight"][int(c)] for c in yb])
    again = list(global_batches(fit_data, epoch=0, seed=7))  # another worker, same seed
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(epoch, again))
    other = np.concatenate([b[1] for b in global_batches(fit_data, epoch=1, seed=7)])
    assert not np.array_equal(other, np.concatenate([b[1] for b in epoch]))  # reshuffled
