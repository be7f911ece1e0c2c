"""Deployment artefacts, checked offline (no cluster and no Docker daemon can run here):
the Kubernetes manifests in deploy/k8s/ against the API schemas of a stated Kubernetes version
(`kubernetes-validate --strict`, which ships the schemas), and the serving image's Dockerfile
that `mlflow models generate-dockerfile` writes for the registered champion, whose model must
load and classify a clip without the project installed (as in the image).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, example_secret, run

from pipeline.config import load_config
from pipeline.serving.champion import champion_uri

pytestmark = pytest.mark.scaleout  # README "Scaling out"; `pytest -m scaleout`

KUBERNETES_VERSION = (
    "1.31.0"  # the oldest minor version EKS and GKE still offer standard support for
)
MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def validate(paths: list[Path]) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run(
        [str(tool), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
    )


def test_every_manifest_is_valid_for_the_stated_kubernetes_version(tmp_path):
    assert {p.name for p in MANIFESTS} >= {"mlflow-server.yaml", "serving.yaml"}
    checked = validate(MANIFESTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    kinds = {
        doc["kind"] for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
    }
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"} <= kinds
    # the check is strict: a misspelt field fails it
    broken = tmp_path / "serving.yaml"
    broken.write_text(
        (ROOT / "deploy" / "k8s" / "serving.yaml")
        .read_text()
        .replace("  replicas: 2", "  replica: 2", 1)
    )
    assert validate([broken]).returncode != 0


def test_the_served_model_is_ready_on_ping_and_scales_on_cpu():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "serving.yaml").read_text())]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["ports"][0]["containerPort"] == 8080  # the generated image's port
    assert container["resources"]["requests"]["cpu"]
    # workers set explicitly (the image's default is one per CPU of the node), as measured
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_MODELS_WORKERS"] == "1"
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.slow  # builds the image context and serves it, ~17 s; CI runs it (make test-all)
def test_generated_dockerfile_serves_the_registered_champion(project, tmp_path):
    """`make serving-image`'s command on the tested project: the image copies the champion's
    model and serves it; that model loads and classifies a clip in a process where the
    project's own `pipeline` package is not importable (the editable install hidden), as in
    the image, where only the model's copy of the code exists."""
    from mlflow.tracking import MlflowClient

    repo, state = project
    store = f"sqlite:///{repo / 'mlflow.db'}"
    env = {**state["env"], "MLFLOW_TRACKING_URI": store}
    out = tmp_path / "serving-image"
    # the recipe's command as make runs it (the venv's tools on PATH)
    recipe = (ROOT / "Makefile").read_text().split("\nserving-image:", 1)[1]
    command = next(
        line for line in recipe.replace("\\\n", " ").splitlines() if "generate-dockerfile" in line
    )
    replacements = (("$(BIN)/", ""), ("$(SERVING_IMAGE_DIR)", str(out)), ("$(CURDIR)", str(repo)))
    for made, shell in (*replacements, ("$$", "$")):
        command = command.replace(made, shell)
    run(["bash", "-c", command], repo, env)
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model_dir /opt/ml/model" in dockerfile and "_serve(" in dockerfile
    assert dockerfile.rstrip().endswith("USER 1000")  # not served as root
    # the champion of the project's dataset: the generated sample's
    config = load_config(repo / "params.yaml")
    name = champion_uri(config.compare, config.dataset).removeprefix("models:/")
    assert name == "handball-action-classifier-sample@champion"
    champion = MlflowClient(tracking_uri=store).get_model_version_by_alias(*name.split("@"))
    mlmodel = yaml.safe_load((out / "model_dir" / "MLmodel").read_text())
    assert mlmodel["run_id"] == champion.run_id
    requirements = (out / "model_dir" / "requirements.txt").read_text()
    for dist in ("tensorflow", "openvino", "opencv-python-headless", "mlflow"):
        assert dist in requirements

    clip = next((repo / "data" / "raw").rglob("*.avi"))
    probe = f"""
import base64, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path = [p for p in sys.path if p not in ("", {str(ROOT)!r}, {str(repo)!r})]
try:
    import pipeline
    raise SystemExit("the project's pipeline package is still importable: " + pipeline.__file__)
except ModuleNotFoundError:
    pass
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model({str(out / "model_dir")!r})
video = base64.b64encode(open({str(clip)!r}, "rb").read()).decode()
row = model.predict(pd.DataFrame({{"video": [video]}})).iloc[0]
print(json.dumps({{"action": row["top_action"], "from": sys.modules["pipeline"].__file__}}))
"""
    shutil.rmtree(tmp_path / "cwd", ignore_errors=True)
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path / "cwd",
        env={k: v for k, v in env.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    classes = json.loads((repo / "data" / "raw" / "classes.json").read_text())
    assert answer["action"] in classes
    assert str(out / "model_dir") in answer["from"]  # the model's own copy of the code
    assert os.path.isfile(out / "model_dir" / "code" / "pipeline" / "serving" / "pyfunc.py")


@pytest.mark.parametrize("name", ["mlflow-server.Dockerfile"])
def test_the_tracking_server_image_pins_the_tested_mlflow(name):
    from importlib.metadata import version

    text = (ROOT / "deploy" / name).read_text()
    assert f"mlflow[auth]=={version('mlflow')}" in text  # with its basic-auth app
    assert "psycopg2-binary" in text and "boto3" in text


def test_each_training_pod_builds_its_tf_config_from_its_completion_index(tmp_path):
    """The Job's own script, run by bash as a pod would run it, with stand-ins for `dvc` and
    `python` on PATH (no cluster, image or remote here) that record their arguments and the
    TF_CONFIG they were started with."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "training-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    service = next(d for d in docs if d["kind"] == "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["TRAIN_WORKERS"])
    assert pod["subdomain"] == service["metadata"]["name"] == env["TRAIN_SERVICE"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dvc", "python"):
        stand_in = bin_dir / tool
        stand_in.write_text(
            f'#!/bin/sh\nprintf \'%s\\n\' "{tool} $*" >> "$CALLS"\n'
            'printf \'%s\\n\' "$TF_CONFIG" >> "$CALLS.tf_config"\n'
        )
        stand_in.chmod(0o755)
    calls = tmp_path / "calls"
    script = container["args"][0]
    proc = subprocess.run(
        [*container["command"], script],
        env={
            **env,
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "JOB_COMPLETION_INDEX": "1",
            "CALLS": str(calls),
        },
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().splitlines() == [
        f"dvc pull {env['MODEL_INPUTS']}",
        f"python -m pipeline.params distribute=multi_worker {env['TRAIN_OVERRIDES']}",
        f"python -m pipeline.stages.train --model {env['MODEL']}",
    ]
    tf_configs = {
        json.dumps(json.loads(line))
        for line in (tmp_path / "calls.tf_config").read_text().splitlines()
    }
    (tf_config,) = map(json.loads, tf_configs)  # the same for every command
    name, port = env["TRAIN_SERVICE"], container["ports"][0]["containerPort"]
    assert tf_config == {
        "cluster": {"worker": [f"{name}-0.{name}:{port}", f"{name}-1.{name}:{port}"]},
        "task": {"type": "worker", "index": 1},
    }


def test_the_training_image_installs_the_project_with_its_s3_remote():
    """The locked runtime with DVC's S3 remote, hashes checked (uv.lock's export)."""
    text = (ROOT / "deploy" / "training.Dockerfile").read_text()
    assert "--require-hashes -r requirements/s3.txt" in text
    pins = (ROOT / "requirements" / "s3.txt").read_text()
    assert "\ndvc-s3==" in pins and "\ntensorflow==" in pins
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = [line for line in lines if line and not line.startswith("#")]
    assert ".venv/" in ignored and "data/" in ignored and ".git" not in ignored


def pod_specs(doc: dict) -> list[dict]:
    """The pod templates of a Deployment or Job."""
    if doc.get("kind") in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def pod_security_problems(doc: dict) -> list[str]:
    """What a manifest's pods lack of the hardening every pod here must have: non-root,
    no privilege escalation, every capability dropped, the root filesystem's mode stated
    (read-only unless the manifest says why not), a seccomp profile."""
    problems = []
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    for pod in pod_specs(doc):
        security = pod.get("securityContext") or {}
        if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
            problems.append(f"{name}: pod securityContext without runAsNonRoot and runAsUser")
        if (security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        for container in pod["containers"]:
            context = container.get("securityContext") or {}
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}/{container['name']}: privilege escalation allowed")
            if "ALL" not in (context.get("capabilities") or {}).get("drop", []):
                problems.append(f"{name}/{container['name']}: capabilities not dropped")
            if "readOnlyRootFilesystem" not in context:
                problems.append(f"{name}/{container['name']}: root filesystem mode not stated")
    return problems


def test_every_pod_runs_as_non_root_without_privileges(tmp_path):
    docs = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]
    assert sum(len(pod_specs(d)) for d in docs) == 3  # tracking server, serving, training
    assert [p for d in docs for p in pod_security_problems(d)] == []
    read_only = {
        c["name"]: c["securityContext"]["readOnlyRootFilesystem"]
        for d in docs
        for pod in pod_specs(d)
        for c in pod["containers"]
    }
    # only the training worker writes into its image (its repository's work tree)
    assert read_only == {"mlflow": True, "model": True, "worker": False}
    # the check fails on a copy of the serving manifest without the container's context
    serving = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "serving.yaml").read_text()))
    deployment = next(d for d in serving if d["kind"] == "Deployment")
    del deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert len(pod_security_problems(deployment)) == 3


def test_the_tracking_server_is_reached_only_by_the_projects_pods_and_hides_its_store_uri():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "mlflow-server.yaml").read_text()))
    server = next(d for d in docs if d["kind"] == "Deployment")
    container = server["spec"]["template"]["spec"]["containers"][0]
    # MLflow reads the store URI (with its password) from the environment, not argv
    assert not any("backend-store-uri" in a for a in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-backend"
    # accounts: MLflow's basic-auth app, its settings, admin password and Flask secret from the
    # Secret mlflow-auth (README "Access control")
    assert "--app-name=basic-auth" in container["args"]
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    [volume] = [n for n, path in mounts.items() if Path(path) == config.parent]
    assert volumes[volume]["secret"]["secretName"] == "mlflow-auth"
    auth = example_secret("mlflow-auth")
    assert {config.name, "admin_password", "flask_secret_key"} <= set(auth)
    assert "default_permission = READ" in auth[config.name]
    assert "postgresql" in auth[config.name]  # the users live in the runs' PostgreSQL
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == server["spec"]["selector"]["matchLabels"]
    [rule] = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "handball-actions"}}}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]


def test_the_training_job_is_pinned_and_bounded():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "training-job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    worker = job["spec"]["template"]["spec"]["containers"][0]
    image = worker["image"]
    assert ":" in image and not image.endswith(":latest")
    # the chief logs to the tracking server with an account from a Secret
    env = {e["name"]: e for e in worker["env"]}
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-client"
    assert 0 < job["spec"]["activeDeadlineSeconds"] <= 24 * 3600


def test_no_credentials_reach_an_image_or_git(tmp_path):
    """Where the README tells users to put credentials (DVC's `.dvc/config.local`, a filled-in
    copy of secrets.example.yaml, environment files): .dockerignore keeps them out of a build
    context, as docker-py lists it by Docker's rules, and git ignores them."""
    from docker.utils.build import exclude_paths

    secrets = [".dvc/config.local", "my-secrets.yaml", "deploy/k8s/prod-secrets.yaml", ".env"]
    kept = ["pipeline/stages/train.py", ".dvc/config", "deploy/k8s/serving.yaml", "params.yaml"]
    for rel in secrets + kept:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    admitted = exclude_paths(str(tmp_path), patterns)
    assert not admitted & set(secrets), admitted & set(secrets)
    assert set(kept) <= admitted
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *secrets, "deploy/k8s/secrets.example.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ignored == secrets  # and the example (placeholders) stays tracked
