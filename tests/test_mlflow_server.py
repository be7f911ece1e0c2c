"""One MLflow tracking server for a team: PostgreSQL as its store, artifacts proxied to S3
(SeaweedFS, `s3_server` in conftest.py), the pipeline and `predict` pointed at it by
MLFLOW_TRACKING_URI only. All real servers on 127.0.0.1 with free ports, started and stopped
here: PostgreSQL 15 from Debian's package (`initdb` + `pg_ctl`, as the `postgres` user when the
tests run as root), `mlflow server` as a user would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import MODELS, free_port, run, stop_process_group, wait_until_serving
from test_inference_e2e import predict_cli
from test_pipeline_e2e import wait_for_queue

pytestmark = [
    pytest.mark.slow,  # a whole tiny pipeline and a queued grid: ~4 min; CI runs it
    pytest.mark.scaleout,  # README "Scaling out"; `pytest -m scaleout`
]


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as `postgres` then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder on a free port, with a database `mlflow`."""
    initdb = shutil.which("initdb") or next(Path("/usr/lib/postgresql").glob("*/bin/initdb"), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    bin_dir = Path(initdb).resolve().parent
    # not under pytest's own temporary root: `postgres` may not enter that (mode 700)
    folder = Path(tempfile.mkdtemp(prefix="handball-postgres-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    run(
        as_postgres([str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"]),
        folder,
        dict(os.environ),
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data), "-w"]
    run(
        as_postgres([*ctl, "-o", options, "-l", str(folder / "postgres.log"), "start"]),
        folder,
        dict(os.environ),
    )
    try:
        run(
            as_postgres(
                [
                    str(bin_dir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "postgres",
                    "mlflow",
                ]
            ),
            folder,
            dict(os.environ),
        )
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_postgres([*ctl, "-m", "fast", "stop"]), cwd=folder, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server` on PostgreSQL, artifacts proxied to `s3://handball/mlflow` (only the
    server holds the storage keys), the Host names a cluster would use allowed."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server["key"],
        "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        postgres,
        "--artifacts-destination",
        f"s3://{s3_server['bucket']}/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--allowed-hosts",
        f"127.0.0.1:{port},localhost:{port},mlflow.handball.svc:5000",
        "--workers",
        "2",
    ]
    log = folder / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", server, log, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(server)


def test_the_pipeline_a_queued_grid_and_predict_use_the_team_server(
    project, mlflow_server, s3_server, tmp_path
):
    from mlflow.tracking import MlflowClient

    repo, state = project
    clone = tmp_path / "clone"
    # a teammate's clone: no storage keys, only the server's address
    env = {k: v for k, v in state["env"].items() if not k.startswith("AWS_")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "repro"], clone, env)
    assert not (clone / "mlflow.db").exists() and not (clone / "mlruns").exists()

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("handball-actions")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    by_model = {r.data.tags.get("model"): r for r in runs if r.data.tags.get("model")}
    assert set(MODELS) <= set(by_model)
    for model in MODELS:
        logged = json.loads((clone / "metrics" / f"{model}.json").read_text())
        server_run = by_model[model]
        assert server_run.data.metrics["test_macro_f1"] == pytest.approx(logged["macro_f1"])
        names = {a.path for a in client.list_artifacts(server_run.info.run_id)}
        assert "config.yaml" in names
    # the artifacts are in the bucket, put there by the server
    import s3fs

    bucket = s3fs.S3FileSystem(
        key=s3_server["key"],
        secret=s3_server["secret"],
        client_kwargs={"endpoint_url": s3_server["endpoint"]},
    )
    assert bucket.find(f"{s3_server['bucket']}/mlflow")
    champion = client.get_model_version_by_alias("handball-action-classifier-sample", "champion")
    ranked = (clone / "reports" / "comparison.csv").read_text().splitlines()
    assert champion.tags["model"] == ranked[1].split(",")[0]  # best on validation

    # predict loads the champion through the server
    clip = next((clone / "data" / "raw").rglob("*.avi"))
    _, rows = predict_cli(
        clone, env, str(clip), "--model", "models:/handball-action-classifier-sample@champion"
    )
    assert rows[0]["action_1"] in json.loads((clone / "data" / "raw" / "classes.json").read_text())

    # a two-point queued grid logs into the same server, tagged with the experiment names
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-q", "-m", "results"], clone, env)
    names = ["server-grid-a", "server-grid-b"]
    for name, epochs in zip(names, (1, 2)):  # the tiny default is 3
        run(
            [
                "dvc",
                "exp",
                "run",
                "--queue",
                "-n",
                name,
                "-S",
                f"models.cnn_gru.train.epochs={epochs}",
            ],
            clone,
            env,
        )
    run(["dvc", "queue", "start", "-j", "2"], clone, env)
    wait_for_queue(clone, env, names)
    tagged = {
        r.data.tags.get("dvc_exp_name")
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("model") == "cnn_gru"
    }
    assert set(names) <= tagged
    assert not (clone / "mlflow.db").exists()
