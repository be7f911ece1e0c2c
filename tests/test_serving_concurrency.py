"""The logged video classifier under concurrent requests, and what it refuses.

A real cnn3d (the pipeline's builder, `experiment=tiny` sizes, seeded random weights: these
tests check serving, not learning) is logged as the pipeline logs it, into an MLflow store of
the test's own, and loaded back as an MLflow pyfunc. No `dvc repro` is needed, so the module
depends on no other test. The `slow` test serves the same model with a real
`mlflow models serve`.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    free_port,
    isolated_mlflow_store,
    post_json,
    stop_process_group,
    wait_until_serving,
    write_numbered_video,
)

CLIENTS = 4


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_params) -> Path:
    """A cnn3d video classifier logged by `log_video_classifier`, downloaded as a model folder
    (what `mlflow artifacts download` gives; `mlflow models serve -m FOLDER` serves it)."""
    import mlflow

    from pipeline.models.builders import build_cnn3d
    from pipeline.models.seeding import seed_everything
    from pipeline.schema import parse_params
    from pipeline.serving.pyfunc import log_video_classifier
    from pipeline.stages.train import preprocessing_record

    folder = tmp_path_factory.mktemp("logged-cnn3d")
    config = parse_params(tiny_params)
    classes = list(config.dataset.classes)
    seed_everything(0)
    model = build_cnn3d(
        config.models.cnn3d, config.frames.num_frames, config.frames.size, len(classes)
    )
    model.save(folder / "cnn3d.keras")
    with isolated_mlflow_store(folder / "mlflow.db"), mlflow.start_run():
        info = log_video_classifier(
            folder / "cnn3d.keras",
            preprocessing_record(config, config.models.cnn3d, classes),
            "cnn3d",
        )
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "m"))
    return Path(local)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """Clips of different lengths (different answers), a recording of several clips' length,
    and a clip cut in half (5 of its 32 frames decode: under tiny's clean.min_frames of 6)."""
    folder = tmp_path_factory.mktemp("videos")
    clips = {}
    for n in (12, 17, 23, 32):
        clips[f"clip{n}"] = folder / f"clip{n}.avi"
        write_numbered_video(clips[f"clip{n}"], n)
    clips["recording"] = folder / "recording.avi"
    write_numbered_video(clips["recording"], 60, fps=10.0)
    raw = clips["clip32"].read_bytes()
    clips["truncated"] = folder / "truncated.avi"
    clips["truncated"].write_bytes(raw[: len(raw) // 2])
    return clips


def load_pyfunc(folder: Path, runtime: str, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("HANDBALL_INFERENCE_RUNTIME", runtime)
    model = mlflow.pyfunc.load_model(str(folder))
    classifier = model.unwrap_python_model().classifier
    assert classifier.runtime == runtime  # built when loaded, not by the first request
    return model, classifier


def request(path: Path) -> pd.DataFrame:
    return pd.DataFrame({"video": [base64.b64encode(path.read_bytes()).decode()]})


@pytest.mark.parametrize("runtime", ["openvino", "keras"])
def test_concurrent_predict_calls_answer_as_one_caller_alone(
    model_folder, videos, runtime, monkeypatch
):
    """Four threads calling the loaded pyfunc's `predict` (what `mlflow models serve` does
    with overlapping requests) and `predict`'s window mode at once: every call answers, and
    answers what a single caller gets."""
    model, classifier = load_pyfunc(model_folder, runtime, monkeypatch)
    clips = [videos[k] for k in ("clip12", "clip17", "clip23", "clip32")]
    alone = {clip: model.predict(request(clip)) for clip in clips}
    alone_windows = classifier.classify_windows(videos["recording"], 1.0, 0.5)
    assert len({round(float(a["top_probability"].iloc[0]), 6) for a in alone.values()}) > 1

    def call(i: int):
        if i % 5 == 4:
            return "windows", classifier.classify_windows(videos["recording"], 1.0, 0.5)
        clip = clips[i % len(clips)]
        return clip, model.predict(request(clip))

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(call, range(40)))
    for key, answer in answers:
        expected = alone_windows if key == "windows" else alone[key]
        pd.testing.assert_frame_equal(answer, expected, check_exact=False, atol=1e-6)
    if runtime == "openvino":  # one infer request per caller at most, reused
        assert 1 <= classifier.runner().requests.created <= CLIENTS


def test_a_truncated_clip_is_refused_with_its_frame_counts(model_folder, videos, monkeypatch):
    from mlflow.exceptions import MlflowException

    model, classifier = load_pyfunc(model_folder, "openvino", monkeypatch)
    assert classifier.pre["min_frames"] == 6  # experiment=tiny's clean.min_frames
    with pytest.raises(MlflowException) as refused:
        model.predict(pd.concat([request(videos["clip12"]), request(videos["truncated"])]))
    assert refused.value.get_http_status_code() == 400
    assert "row 1: 5 decodable frames, the model needs at least 6" in refused.value.message
    assert str(videos["truncated"].parent) not in refused.value.message
    # window mode: a window shorter than the minimum is refused, naming the window
    from pipeline.serving.clips import TooFewFrames

    with pytest.raises(
        TooFewFrames, match="5 frames in a 0.5 s window, the model needs at least 6"
    ):
        classifier.classify_windows(videos["recording"], 0.5, 0.5)


def test_predict_skips_a_truncated_clip_and_classifies_the_others(model_folder, videos, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    good, truncated = videos["clip17"], videos["truncated"]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", str(good), str(truncated)]
        + ["--model", str(model_folder), "--format", "json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in json.loads(proc.stdout)}
    assert rows[good.name]["action_1"] and not rows[good.name].get("error")
    assert rows[truncated.name]["error"] == (
        f"{truncated}: 5 decodable frames, the model needs at least 6 (clean.min_frames it "
        "was trained with: shorter clips were left out of its training and evaluation)"
    )
    assert "1 of 2 files classified" in proc.stderr


def test_a_fault_of_the_server_is_not_reported_as_the_clients(
    model_folder, videos, monkeypatch, caplog
):
    """A runner that fails (a stand-in: a fault of the server cannot be caused on demand in a
    real runtime) gives INTERNAL_ERROR (HTTP 500) and its traceback in the log."""
    from mlflow.exceptions import MlflowException

    model, classifier = load_pyfunc(model_folder, "openvino", monkeypatch)

    class BrokenRunner:
        def predict_on_batch(self, batch):
            raise RuntimeError("the CPU plugin lost its memory")

    monkeypatch.setattr(classifier, "_runner", BrokenRunner())
    with pytest.raises(MlflowException) as failed:
        model.predict(request(videos["clip12"]))
    assert failed.value.get_http_status_code() == 500
    assert "RuntimeError: the CPU plugin lost its memory" in failed.value.message
    assert "the fault is the server's" in failed.value.message
    assert "Traceback" in caplog.text and "the CPU plugin lost its memory" in caplog.text


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its children, in bytes."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


@pytest.mark.slow
def test_served_model_under_four_concurrent_clients(model_folder, videos, tmp_path):
    """`mlflow models serve` (one worker, as the README starts it) and 4 clients sending 120
    requests, one in four bad: every good one is answered 200 as one client alone is answered,
    every bad one 4xx naming the problem; the server is alive after and its memory grew by
    less than a quarter."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "HANDBALL_INFERENCE_RUNTIME"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # its uvicorn
    with open(log, "w") as out:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve"]
            + ["-m", str(model_folder), "--env-manager", "local"]
            + ["-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/ping", server, log, timeout=180)
        clips = [videos[k] for k in ("clip12", "clip17", "clip23", "clip32")]
        payloads = {c: {"dataframe_records": [{"video": b64(c)}]} for c in clips}
        alone = {}
        for clip in clips:
            status, body = post_json(f"{url}/invocations", payloads[clip])
            assert status == 200, body[:1000]
            alone[clip] = json.loads(body)["predictions"]
        memory_before = tree_rss(server.pid)
        bad = {
            "not a video": (
                {"dataframe_records": [{"video": base64.b64encode(b"text").decode()}]},
                "not a readable video",
            ),
            "truncated": (
                {"dataframe_records": [{"video": b64(videos["truncated"])}]},
                "row 0: 5 decodable frames, the model needs at least 6",
            ),
            "empty record": ({"dataframe_records": [{}]}, "needs a `video` field"),
        }
        plan = [
            ("bad", list(bad)[(i // 4) % 3]) if i % 4 == 3 else ("good", clips[i % 4])
            for i in range(120)
        ]

        def send(item):
            kind, key = item
            payload = payloads[key] if kind == "good" else bad[key][0]
            return item, *post_json(f"{url}/invocations", payload)

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(send, plan))
        memory_after = tree_rss(server.pid)
        for (kind, key), status, body in results:
            if kind == "good":
                assert status == 200, (key, body[:1000])
                assert json.loads(body)["predictions"] == alone[key]
            else:
                assert 400 <= status < 500 and bad[key][1] in body, (key, status, body[:1000])
        assert sum(kind == "bad" for kind, _ in plan) == 30
        status, body = post_json(f"{url}/invocations", payloads[clips[0]])  # still serving
        assert status == 200 and json.loads(body)["predictions"] == alone[clips[0]]
        assert server.poll() is None
        assert memory_after <= 1.25 * memory_before, (memory_before, memory_after)
    finally:
        stop_process_group(server)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
