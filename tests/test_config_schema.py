"""The config schema (pipeline/schema.py): bad configurations are refused where they enter, in
a second, with one line per problem naming the key, the value and what is allowed; every
configuration the project ships is accepted."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest
import yaml
from conftest import ROOT

from pipeline.params import compose_params, main
from pipeline.schema import InvalidConfig, validate_params

# (overrides, a line the refusal must contain)
BAD = [
    (["models.cnn_gru.dropout=abc"], "models.cnn_gru.dropout='abc': must be a number >= 0 and < 1"),
    (["models.cnn3d.train.epochs=-5"], "models.cnn3d.train.epochs=-5: must be a whole number >= 1"),
    (["frames.size=0"], "frames.size=0: must be a whole number >= 16"),
    (["seed=abc"], "seed='abc': must be a whole number >= 0"),
    (["features.batch_size='32'"], "features.batch_size='32': must be a whole number >= 1"),
    (["models.cnn_gru.dropuot=0.2"], "models.cnn_gru.dropuot=0.2: not a setting of models.cnn_gru"),
    (
        ["+models.cnn_gru.dropuot=0.2"],
        "models.cnn_gru.dropuot=0.2: not a setting of models.cnn_gru",
    ),
    (["+foo=1"], "foo=1: not a setting of the config (it has: augment, baseline"),
    (  # a setting the schema has but conf/ leaves at its default: how to add it
        ["dataset.max_unpacked_gb=50"],
        "dataset.max_unpacked_gb=50: conf/ does not set dataset.max_unpacked_gb (its default "
        "is 100): add it with +dataset.max_unpacked_gb=50",
    ),
    (["compare.metric=f1"], "compare.metric='f1': must be one of 'accuracy', 'balanced_accuracy'"),
    (["models.frame_cnn.train.optimizer=sgd"], "optimizer='sgd': must be one of 'adam', 'adamw'"),
    (["dataset.classes=[]"], "dataset.classes=[]: must be a list (of a non-empty text) with at"),
    (["dataset.classes=[shot,shot]"], "dataset: classes ['shot', 'shot'] list a class twice"),
    (
        ["clean.val_fraction=0.5", "clean.test_fraction=0.5"],
        "clean: val_fraction 0.5 + test_fraction 0.5 leave no training clips",
    ),
    (["models.cnn3d.head.dropout=[0.3]"], "models.cnn3d.head: units [128, 64, 32] and dropout"),
    (["models.cnn3d.train.lr_decay=linear"], "lr_decay='linear': must be one of 'cosine' or a"),
    (["models.cnn3d.train.lr_decay=null"], "warmup_epochs=3 needs lr_decay: cosine"),
    (["compare.ensemble.members=[cnn3d,lstm]"], "compare.ensemble.members[1]='lstm': must be one"),
    (["compare.ensemble.weight_step=0.3"], "weight_step=0.3 must divide 1 into equal parts"),
    (["train_seeds=[]"], "train_seeds=[]: must be a list (of a whole number >= 0) with at least"),
    (["models.cnn_gru.train.class_weights=1"], "class_weights=1: must be true or false"),
    (["dataset.sample.counts.jump-shot=0"], "dataset.sample.counts.jump-shot=0: must be a whole"),
    (["dataset=folder", "dataset.source=url"], "dataset: source='url' needs url, sha256"),
    (["dataset=folder", "dataset.path=null"], "dataset.tracked=None: must be a non-empty text"),
    (["clean.group_pattern='(x'"], "clean: group_pattern is not a regular expression"),
    (["distribute.strategy=tpu"], "distribute.strategy='tpu': must be one of 'none'"),
    (["frames.sampling=random"], "frames.sampling='random': must be one of 'uniform'"),
    (["frames.flow.enabled=false"], "models.frame_cnn.motion='flow' read(s) optical flow, which"),
    (
        ["inputs=flow", "models.frame_cnn.backbone.weights=imagenet"],
        "models.frame_cnn: motion 'rgb_flow' gives the backbone more or fewer than 3 channels",
    ),
    (
        ["inputs=flow", "models.cnn3d.clip_augment={flip:true}"],
        "models.cnn3d: clip_augment flips and recolours RGB frames inside the model, not",
    ),
    (
        ["inputs=flow", "models.cnn_gru.train.oversample=true"],
        "models.cnn_gru: flow_grid=4 with train.oversample=true",
    ),
    (["frames.flow.farneback.poly_n=6"], "frames.flow.farneback.poly_n=6: must be one of 5, 7"),
    (
        ["models.cnn3d.tta_views=true"],
        "models.cnn3d.tta_views=true pick(s) among the cached frames, but models.cnn3d.num_frames=",
    ),
    (
        ["frames.num_frames=12", "models.frame_cnn.num_frames=8"]
        + ["models.frame_cnn.train.temporal_jitter=true"],
        "frames.num_frames=12 leaves no choice: cache at least twice the frames the model reads",
    ),
    (
        ["models.cnn_gru.train.temporal_jitter=true", "models.cnn_gru.train.oversample=true"],
        "models.cnn_gru: train.temporal_jitter with train.oversample=true",
    ),
    (
        ["models.cnn3d.train.mixup=0.4", "distribute.strategy=multi_worker"],
        "models.cnn3d.train.mixup=0.4 with distribute.strategy=multi_worker: its training",
    ),
    (["models.frame_cnn.train.mixup=-1"], "models.frame_cnn.train.mixup=-1"),
    (
        ["compare.register_as='actions-{datset}'"],
        "compare: register_as='actions-{datset}': the only placeholder is {dataset}",
    ),
]


@pytest.mark.parametrize(("overrides", "line"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_pipeline_params_refuses_a_bad_config_naming_the_key(overrides, line, tmp_path, caplog):
    """`python -m pipeline.params <overrides>` (in-process): exit status 2, the problem on
    one log line, nothing written, well under 5 seconds."""
    out = tmp_path / "params.yaml"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main([*overrides, "--out", str(out)])
    assert time.perf_counter() - start < 5
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(line in e for e in errors), errors
    assert all("\n" not in e for e in errors[:-1])  # one line per problem
    assert "Traceback" not in caplog.text and not out.exists()


def test_every_problem_is_reported_at_once_by_the_command_as_typed(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.params",
            "models.cnn3d.train.epochs=-5",
            "seed=abc",
            "+models.cnn_gru.dropuot=0.2",
            "--out",
            str(tmp_path / "params.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("models.cnn3d.train.epochs=-5", "seed='abc'", "models.cnn_gru.dropuot=0.2"):
        assert key in proc.stderr, proc.stderr
    assert "3 problem(s); nothing written" in proc.stderr
    assert not (tmp_path / "params.yaml").exists()


def test_every_shipped_composition_is_valid():
    """Each choice of every config group (and the committed params.yaml) passes the schema:
    a typo in a conf/*.yaml file fails here."""
    validate_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    groups = {
        "experiment": ["sample", "tiny", "uniri_hbd"],
        "dataset": ["sample", "folder", "uniri_hbd"],
        "recipe": ["learning", "reference"],
        "inputs": ["default", "motion"],
    }
    for choice in itertools.product(*groups.values()):
        overrides = [f"{group}={value}" for group, value in zip(groups, choice)]
        validate_params(compose_params(overrides, conf_dir=ROOT / "conf"))
    for strategy in ("none", "mirrored", "multi_worker"):
        validate_params(compose_params([f"distribute={strategy}"], conf_dir=ROOT / "conf"))


def settings_missing_from(typed: dict, composed: dict, prefix: str) -> list[str]:
    """The keys of `typed` (a section as the schema fills it in) that `composed` lacks."""
    missing = []
    for key, value in typed.items():
        if key not in composed:
            missing.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(composed[key], dict):
            missing += settings_missing_from(value, composed[key], f"{prefix}{key}.")
    return missing


def test_every_setting_a_model_trains_with_is_written_in_conf():
    """What a model trains with comes from conf/ (`params.yaml`, which DVC tracks for each
    stage), never from a default of pipeline/schema/, which is no stage's dependency: a
    changed default there would change results without DVC rerunning anything."""
    from pipeline.schema import parse_params

    for overrides in ([], ["recipe=reference"], ["experiment=uniri_hbd"], ["inputs=flow"]):
        composed = compose_params(overrides, conf_dir=ROOT / "conf")
        typed = parse_params(composed).models.model_dump()
        assert settings_missing_from(typed, composed["models"], "models.") == [], overrides


def test_a_typo_in_a_conf_file_is_refused(tmp_path):
    import shutil

    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    model = conf / "model" / "cnn_gru.yaml"
    model.write_text(model.read_text().replace("dropout: 0.3", "dropuot: 0.3"))
    with pytest.raises(InvalidConfig) as refused:
        validate_params(compose_params(conf_dir=conf))
    assert "models.cnn_gru.dropuot=0.3: not a setting of models.cnn_gru" in str(refused.value)
    assert "models.cnn_gru.dropout: missing; must be a number >= 0 and < 1" in str(refused.value)


def test_a_stage_refuses_a_hand_edited_params_file_before_reading_data(tmp_path):
    """A stage started on an invalid params.yaml exits with status 2 and the problems, before
    it reads data (its paths hold none: reading would fail otherwise) or opens an MLflow run
    (no store appears). Not timed: under a busy CPU the start-up alone took over 10 s."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["models"]["cnn3d"]["train"]["epochs"] = 0
    params["seed"] = "42"
    params["paths"] = {k: str(tmp_path / k) for k in params["paths"]}  # nothing to read there
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.train", "--model", "cnn3d", "--params", str(bad)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "models.cnn3d.train.epochs=0: must be a whole number >= 1" in proc.stderr
    assert "seed='42': must be a whole number >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.db").exists()
