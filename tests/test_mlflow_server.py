"""One MLflow tracking server for a team: PostgreSQL as its store, artifacts proxied to S3
(SeaweedFS, `s3_server` in conftest.py), accounts and permissions by MLflow's basic-auth app
(its users in the same PostgreSQL), the pipeline and `predict` pointed at it by
MLFLOW_TRACKING_URI and MLFLOW_TRACKING_USERNAME/PASSWORD only. All real servers on 127.0.0.1
with free ports, started and stopped here: PostgreSQL 15 from Debian's package (`initdb` +
`pg_ctl`, as the `postgres` user when the tests run as root), `mlflow server --app-name
basic-auth` as deploy/k8s/mlflow-server.yaml runs it.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    MODELS,
    example_secret,
    free_port,
    new_shell_env,
    project_copy,
    readme_commands,
    run,
    stop_process_group,
    wait_until_serving,
)
from test_inference_e2e import predict_cli
from test_pipeline_e2e import wait_for_queue

pytestmark = [
    pytest.mark.slow,  # a whole tiny pipeline and a queued grid: 452 s alone; CI runs it
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


def deployed_auth_settings(database_uri: str) -> str:
    """The auth settings of deploy/k8s/secrets.example.yaml (Secret `mlflow-auth`), as the
    Deployment mounts them, with this test's database: the test serves what users deploy."""
    config = configparser.ConfigParser()
    config.read_string(example_secret("mlflow-auth")["basic_auth.ini"])
    assert config["mlflow"]["admin_username"] == ADMIN[0]
    config["mlflow"]["database_uri"] = database_uri
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


ADMIN = ("admin", "admin-password-of-the-test")
# the accounts README "Access control" creates, and one that is granted nothing
PASSWORDS = {"ana": "ana-password-of-the-test", "bo": "bo-password-of-the-test"}
READER = ("carl", "carl-password-of-the-test")


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """`mlflow server --app-name basic-auth` on PostgreSQL, its users' tables in the same
    database, everyone READ by default, artifacts proxied to `s3://handball/mlflow` (only the
    server holds the storage keys), the Host names a cluster would use allowed; the admin's
    password and the Flask secret from the environment, as the Secret `mlflow-auth` gives them."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    auth_config = folder / "basic_auth.ini"
    auth_config.write_text(deployed_auth_settings(postgres))
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server["key"],
        "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        "MLFLOW_S3_ENDPOINT_URL": s3_server["endpoint"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-secret-of-the-test",
        # MLflow reads the store from here, as the Deployment has it (not on the command line)
        "MLFLOW_BACKEND_STORE_URI": postgres,
    }
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
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
    SERVER_LOG.append(log)
    with open(log, "w") as out:
        server = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", server, log, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(server)


SERVER_LOG: list[Path] = []  # the module's server's log, for failure messages


def log_tail(lines: int = 60) -> str:
    return "\n".join(SERVER_LOG[-1].read_text(errors="replace").splitlines()[-lines:])


def as_user(env: dict, server: str, account: tuple[str, str] | None) -> dict:
    """`env` pointed at the server as `account` (None: anonymous), without storage keys."""
    prefixes = ("AWS_", "MLFLOW_TRACKING_", "MLFLOW_REGISTRY_")
    out = {k: v for k, v in env.items() if not k.startswith(prefixes)}
    out["MLFLOW_TRACKING_URI"] = server
    if account:
        out["MLFLOW_TRACKING_USERNAME"], out["MLFLOW_TRACKING_PASSWORD"] = account
    return out


@pytest.fixture(scope="module")
def team(mlflow_server, tmp_path_factory):
    """The team README "Access control" sets up, by its commands as printed, run by the admin
    in a new shell (passwords typed on stdin), plus `carl`, who is granted nothing; then bo's
    clone of the project after his `dvc repro` against the server. The project is a copy of its
    own, not the shared `project` (whose repro bo's clone would not use)."""
    repo = tmp_path_factory.mktemp("project-of-the-team")
    project_env = project_copy(repo, [])
    folder = tmp_path_factory.mktemp("team")
    admin = new_shell_env(as_user(project_env, mlflow_server, ADMIN))
    accounts = {**PASSWORDS, READER[0]: READER[1]}
    commands = readme_commands("python -m pipeline.server_access")
    commands.append(f"python -m pipeline.server_access add-user {READER[0]}")
    for command in commands:
        user = command.split()[-1]
        typed = accounts[user] + "\n" if " add-user " in command else ""
        proc = subprocess.run(
            ["bash", "-c", f"source .venv/bin/activate && {command}"],
            cwd=repo,
            env=admin,
            input=typed,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"{command}: {proc.stderr[-3000:]}"
    clone = folder / "bo"
    env = as_user(project_env, mlflow_server, ("bo", PASSWORDS["bo"]))
    run(["git", "clone", "-q", str(repo), str(clone)], folder, env)
    run(["dvc", "repro"], clone, env)
    return clone, env


def test_the_pipeline_a_queued_grid_and_predict_use_the_team_server(
    team, mlflow_server, s3_server, monkeypatch
):
    from mlflow.tracking import MlflowClient

    # bo's clone: no storage keys, only the server's address and his account
    clone, env = team
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bo")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["bo"])
    assert not (clone / "mlflow.db").exists() and not (clone / "mlruns").exists()

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
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

    # a two-point queued grid (`dvc exp run`) logs into the same server as bo, tagged with the
    # experiment names
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


def refused(cmd: list[str], cwd: Path, env: dict) -> str:
    """The one log line a command the server refuses ends with (exit status 2, no traceback)."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, f"{' '.join(cmd)}: {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    return line


def test_the_team_server_refuses_what_an_account_may_not_do(
    team, mlflow_server, monkeypatch, tmp_path
):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.errors import refusal_message

    clone, bo = team
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the server refusals name
    champion = "models:/handball-action-classifier-sample@champion"
    clip = str(next((clone / "data" / "raw").rglob("*.avi")))
    predict = [sys.executable, "-m", "pipeline.predict", clip, "--model", champion]

    # anyone without an account: 401, and the commands say what to set
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/search?max_results=1")
    assert answer.value.code == 401
    line = refused(predict, clone, as_user(bo, mlflow_server, None))
    assert (
        "HTTP 401" in line and "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line
    )
    wrong = refused(predict, clone, as_user(bo, mlflow_server, ("bo", "not-bos-password")))
    assert "refused user 'bo' (HTTP 401" in wrong and "MLFLOW_TRACKING_PASSWORD" in wrong

    # carl holds the default, READ: he looks, and loads the champion ...
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", READER[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", READER[1])
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    experiment = client.get_experiment_by_name("handball-actions")
    assert client.search_runs([experiment.experiment_id])
    carl = as_user(bo, mlflow_server, READER)
    run(predict, clone, carl)
    # ... but logs, registers and moves the alias nothing
    version = client.get_model_version_by_alias("handball-action-classifier-sample", "champion")
    writes = {
        "create a run": lambda: client.create_run(experiment.experiment_id),
        "register a version": lambda: client.create_model_version(
            "handball-action-classifier-sample", version.source, version.run_id
        ),
        "move the alias": lambda: client.set_registered_model_alias(
            "handball-action-classifier-sample", "champion", version.version
        ),
    }
    for what, write in writes.items():
        with pytest.raises(MlflowException) as refusal:
            write()
            pytest.fail(f"carl (READ) was allowed to {what}; the server's log ends:\n{log_tail()}")
        assert refusal.value.get_http_status_code() == 403, what
    compare = [sys.executable, "-m", "pipeline.stages.compare"]
    line = refused(compare, clone, carl)
    assert "refused user 'carl' (HTTP 403" in line and "EDIT on the experiment" in line
    # a sweep he starts stops before its first job, on the same line
    sweep = [sys.executable, "-m", "pipeline.sweep", "-m", "model=cnn_gru", "experiment=tiny"]
    sweep.append(f"hydra.sweep.dir={tmp_path / 'multirun'}")
    proc = subprocess.run(sweep, cwd=clone, env=carl, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "refused user 'carl' (HTTP 403" in output and "Epoch 1/" not in output

    # the admin changes what carl holds: a second grant replaces the first
    admin = as_user(bo, mlflow_server, ADMIN)
    access = [sys.executable, "-m", "pipeline.server_access"]
    for permission in ("EDIT", "READ"):
        run(
            [*access, "grant", "carl", permission, "--experiment", "handball-actions"], clone, admin
        )
    shown = run([*access, "show", "carl", "--experiment", "handball-actions"], clone, admin)
    assert "carl: READ on the experiment handball-actions" in shown

    # ana trains (EDIT on the experiment) but does not promote: bo holds the registered model
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ana")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["ana"])
    client.set_terminated(client.create_run(experiment.experiment_id).info.run_id)
    with pytest.raises(MlflowException) as refusal:
        client.create_model_version(
            "handball-action-classifier-sample", version.source, version.run_id
        )
    line = refusal_message(refusal.value)
    assert "refused user 'ana' (HTTP 403" in line and "EDIT on the registered model" in line
    assert "compare.register_as=null" in line
    assert (
        client.get_model_version_by_alias("handball-action-classifier-sample", "champion").version
        == version.version
    )
