"""Inference on the models the end-to-end `dvc repro` trained (the shared `project` fixture):
`python -m pipeline.predict` and `mlflow models serve` on real video files.

These tests read the project as the first `dvc repro` left it (its champion is the best model
of reports/comparison.csv); pytest runs this module before test_pipeline_e2e.py, whose
experiments move the workspace and the champion on. `first_repro_state` checks that.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml
from conftest import (
    MODELS,
    champion_name,
    free_port,
    logged_model,
    post_json,
    wait_until_serving,
)


def predict_cli(repo: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", *args, "--format", "json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, json.loads(proc.stdout)


@pytest.fixture
def first_repro_state(project):
    """The project, checked to be as the first `dvc repro` left it."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        champion_name(params), "champion"
    )
    best = pd.read_csv(repo / "reports" / "comparison.csv")["model"].iloc[0]
    assert champion.run_id == logged_model(repo, best)["run_id"], (
        "the project moved on before the inference tests (run this module first)"
    )
    return repo, state


def download_model(repo: Path, uri: str, dst: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))


def test_default_model_is_the_champion_else_the_latest_comparisons_best(
    first_repro_state, monkeypatch
):
    from pipeline.schema import parse_params
    from pipeline.serving.champion import default_model
    from pipeline.serving.predict import use_project_store

    repo, _ = first_repro_state
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    store = use_project_store()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    name = champion_name(params)
    uri, why = default_model(parse_params(params), store)
    assert uri == f"models:/{name}@champion" and f"the registered {name}@champion" in why
    params["compare"]["register_as"] = "never-registered"
    uri, why = default_model(parse_params(params), store)
    best = pd.read_csv(repo / "reports" / "comparison.csv")["model"].iloc[0]
    assert uri == logged_model(repo, best)["model_uri"]
    assert "no never-registered@champion is registered" in why and best in why


@pytest.mark.slow  # four models loaded by four `predict` processes: ~65 s; CI runs it
def test_predict_reproduces_the_evaluation_predictions(first_repro_state, tmp_path):
    """Each model and the ensemble of them, through the preprocessing logged with it, gives
    every test clip the label and probability the evaluation gave it; the champion is the default model; an unreadable
    file among the inputs is reported and skipped."""
    repo, state = first_repro_state
    params = yaml.safe_load((repo / "params.yaml").read_text())
    bad = tmp_path / "notes.avi"
    bad.write_text("not a video")
    champion = pd.read_csv(repo / "reports" / "comparison.csv")["model"].iloc[0]
    for model in [*MODELS, "ensemble"]:  # the ensemble: logged in the comparison run
        expected = pd.read_csv(repo / "reports" / model / "predictions.csv")
        clips = [str(repo / "data" / "raw" / p) for p in expected["path"]]
        ref = logged_model(repo, model)
        if model == "frame_cnn":  # a model folder on disk, as `mlflow artifacts download` gives
            uri = download_model(repo, ref["model_uri"], tmp_path / "frame_cnn_model")
        else:  # the run that logged it
            uri = f"runs:/{ref['run_id']}/{model}"
        default = model == champion
        args = [*clips, str(bad)] if default else [*clips, "--model", uri]
        proc, rows = predict_cli(repo, state["env"], *args, "--top-k", "2")
        by_path = {
            Path(r["path"]).relative_to(repo / "data" / "raw").as_posix(): r
            for r in rows
            if "error" not in r or not r["error"]
        }
        for clip in expected.itertuples():
            row = by_path[clip.path]
            assert row["action_1"] == clip.predicted, (model, clip.path)
            assert row["probability_1"] == pytest.approx(clip.confidence, abs=2e-3)
            assert row["probability_2"] <= row["probability_1"]
            # JSON also carries every class's probability, keyed by class
            probabilities = row["probabilities"]
            assert list(probabilities) == params["dataset"]["classes"]
            assert sum(probabilities.values()) == pytest.approx(1.0, abs=0.01)
            assert probabilities[row["action_1"]] == row["probability_1"]
        if default:
            name = champion_name(params)
            assert f"the registered {name}@champion" in proc.stderr
            assert [r["error"] for r in rows if r.get("error")] and "notes.avi" in proc.stderr
            assert f"{len(clips)} of {len(clips) + 1} files classified" in proc.stderr


@pytest.mark.slow  # four `predict` processes, ~40 s; CI runs it
def test_predict_hflip_averages_each_clip_with_its_mirror_image(first_repro_state):
    """`predict --hflip` (test-time averaging): cnn3d's answers change to the mean over each
    clip and its mirror image (still probabilities); cnn_gru, on features, says it ignores it."""
    repo, state = first_repro_state
    expected = pd.read_csv(repo / "reports" / "cnn3d" / "predictions.csv")
    clips = [str(repo / "data" / "raw" / p) for p in expected["path"][:4]]
    answers = {}
    for model in ("cnn3d", "cnn_gru"):
        ref = logged_model(repo, model)
        uri = f"runs:/{ref['run_id']}/{model}"
        for flag in ((), ("--hflip",)):
            proc, rows = predict_cli(repo, state["env"], *clips, "--model", uri, *flag)
            answers[model, bool(flag)] = [r["probabilities"] for r in rows]
            if flag and model == "cnn_gru":
                assert "reads features, not frames; ignored" in proc.stderr
    assert answers["cnn3d", True] != answers["cnn3d", False]
    for row in answers["cnn3d", True]:
        assert sum(row.values()) == pytest.approx(1.0, abs=0.01)
    assert answers["cnn_gru", True] == answers["cnn_gru", False]


def write_recording(path: Path, clips: list[Path], fps: float = 10.0) -> float:
    """Several clips one after another in one .avi (a 'practice recording'); its length in s."""
    writer, frames = None, 0
    for clip in clips:
        cap = cv2.VideoCapture(str(clip))
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
            writer.write(frame)
            frames += 1
        cap.release()
    writer.release()
    return frames / fps


@pytest.mark.slow  # a `predict` process over a stitched recording, ~15 s; CI runs it
def test_sliding_windows_give_a_timeline_and_a_png_strip(project, tmp_path):
    repo, state = project
    clips = sorted((repo / "data" / "raw").rglob("*.avi"))[:3]
    recording = tmp_path / "practice.avi"
    length = write_recording(recording, clips)
    png = tmp_path / "strip.png"
    _, rows = predict_cli(
        repo,
        state["env"],
        str(recording),
        "--window",
        "1.0",
        "--stride",
        "0.5",
        "--timeline-png",
        str(png),
    )
    assert len(rows) >= 2 * length - 2
    starts = [r["start_s"] for r in rows]
    assert starts == sorted(starts) and starts[0] == 0
    assert rows[-1]["end_s"] == pytest.approx(length, abs=0.11)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert all(
        r["action_1"] in params["dataset"]["classes"] and 0 < r["probability_1"] <= 1 for r in rows
    )
    assert all(r["probabilities"][r["action_1"]] == r["probability_1"] for r in rows)
    strip = cv2.imread(str(png))
    assert strip is not None and strip.shape[1] > strip.shape[0] > 50


@pytest.fixture
def served_champion(first_repro_state):
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1, as the README starts it
    (local environment: this machine cannot build a fresh one offline), with small request caps:
    1 MB per video, 3 videos and 25 decoded frames per request."""
    repo, state = first_repro_state
    params = yaml.safe_load((repo / "params.yaml").read_text())
    port = free_port()
    env = {
        **state["env"],
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "HANDBALL_MAX_VIDEO_MB": "1",
        "HANDBALL_MAX_ROWS": "3",
        "HANDBALL_MAX_FRAMES": "25",  # one tiny clip (10-14 frames) fits, three do not
    }
    env.pop("HANDBALL_SERVE_PATH_ROOT", None)  # the default: no reading files by path
    # the server writes to it until the test stops it
    log = open(repo / "serve.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{champion_name(params)}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(f"{url}/ping", server, repo / "serve.log", timeout=180)
    try:
        yield url, repo, params
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_served_champion_classifies_posted_video_and_refuses_bad_requests(served_champion):
    url, repo, params = served_champion
    champion = pd.read_csv(repo / "reports" / "comparison.csv")["model"].iloc[0]
    expected = pd.read_csv(repo / "reports" / champion / "predictions.csv").iloc[0]
    clip = repo / "data" / "raw" / expected["path"]
    video = base64.b64encode(clip.read_bytes()).decode()
    classes = params["dataset"]["classes"]

    def classify() -> dict:
        status, body = post_json(f"{url}/invocations", {"dataframe_records": [{"video": video}]})
        assert status == 200, body
        [answer] = json.loads(body)["predictions"]
        return answer

    answer = classify()
    assert answer["top_action"] == expected["predicted"]
    assert answer["top_probability"] == pytest.approx(expected["confidence"], abs=2e-3)
    assert sum(answer[c] for c in classes) == pytest.approx(1.0, abs=1e-4)

    big = base64.b64encode(os.urandom(1_200_000)).decode()
    for payload, message in [
        (
            {"dataframe_records": [{"video": base64.b64encode(b"just text").decode()}]},
            "not a readable video",
        ),
        ({"dataframe_records": [{"video": ""}]}, "both missing or empty"),
        ({"dataframe_records": [{"video": big}]}, "over the 1 MB limit"),
        ({"dataframe_records": [{"video": "%%% not base64"}]}, "not valid base64"),
        ({"dataframe_records": [{"clip": video}]}, "video"),
        # files named by path are not read unless the server was started with a root
        ({"dataframe_records": [{"path": str(clip)}]}, "does not read files by `path`"),
        ({"dataframe_records": [{"video": video}] * 4}, "a request holds at most 3"),
        ({"dataframe_records": [{"video": video}] * 3}, "decodes more than 25 frames"),
    ]:
        status, body = post_json(f"{url}/invocations", payload)
        assert 400 <= status < 500 and message in body, (status, body[:500])
    assert classify() == answer  # still serving, same answer
