"""Which stages an experiment ran (`pipeline.experiment_stages`), on a real git + DVC
repository of three toy stages and two real `dvc exp run`s: the out-of-fold scores read a
model's outputs from an experiment only when the experiment made them."""

import sys

import pytest
import yaml
from conftest import git_env, run

from pipeline.errors import PipelineError
from pipeline.experiment_stages import experiment_stale_inputs, stale_inputs
from pipeline.fold_scores import check_trained, member_sources

WRITE = f"{sys.executable} -c \"import sys; open(sys.argv[1], 'w').write(sys.argv[2])\""


SECOND = "import sys; open('second.txt', 'w').write(sys.argv[1])\n"


def toy_repo(repo, env) -> None:
    """Stages `first` (param a), `second` (param b, code second.py), and `third` reading
    first's output."""
    (repo / "params.yaml").write_text("a: 1\nb: {c: 1.0e-05}\n")  # as PyYAML writes 1e-05
    (repo / "second.py").write_text(SECOND)
    stages = {
        "first": {"cmd": f"{WRITE} first.txt ${{a}}", "params": ["a"], "outs": ["first.txt"]},
        "second": {
            "cmd": f"{sys.executable} second.py ${{b.c}}",
            "params": ["b"],
            "deps": ["second.py"],
            "outs": ["second.txt"],
        },
        "third": {
            "cmd": f"{sys.executable} -c \"open('third.txt', 'w').write(open('first.txt').read())\"",
            "deps": ["first.txt"],
            "outs": ["third.txt"],
        },
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    run(["dvc", "repro", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-q", "-m", "toy"], repo, env)


def test_an_experiment_ran_the_stages_whose_lock_entry_agrees_with_it(tmp_path, monkeypatch):
    """`dvc exp run -S a=2 first` keeps third's output from before (it reads first's old
    output) and second's (its param did not change: still its own); `-S b.c=2 first` leaves
    second's output made with the old b, and a changed second.py second's output made by the
    old code. Each stale stage names what differs; a revision that does not exist is a clear
    error."""
    repo = tmp_path / "toy"
    repo.mkdir()
    env = git_env()
    toy_repo(repo, env)
    run(["dvc", "exp", "run", "-q", "-n", "new-a", "-S", "a=2", "first"], repo, env)
    run(["dvc", "exp", "run", "-q", "-n", "new-b", "-S", "b.c=2", "first"], repo, env)
    (repo / "second.py").write_text(SECOND.replace("sys.argv[1]", "sys.argv[1] * 2"))
    run(["dvc", "exp", "run", "-q", "-n", "new-code", "-S", "b.c=1e-05", "first"], repo, env)
    monkeypatch.chdir(repo)
    assert experiment_stale_inputs("new-code", "second") == ["second.py"]
    assert experiment_stale_inputs("new-code", "first") == []
    assert experiment_stale_inputs("new-a", "first") == []
    assert experiment_stale_inputs("new-a", "second") == []
    assert experiment_stale_inputs("new-a", "third") == ["first.txt"]
    assert experiment_stale_inputs("new-b", "second") == ["params.yaml: b"]
    assert experiment_stale_inputs("main", "third") == []
    assert experiment_stale_inputs("main", "second") == []  # dvc.lock holds b.c as 1e-05
    with pytest.raises(PipelineError, match="cannot read dvc.lock"):
        experiment_stale_inputs("no-such-experiment", "first")


def test_scores_refuse_a_model_the_experiment_did_not_train(monkeypatch):
    """The stale-entry rule, and how `score` uses it: a scored model's experiment must have
    trained it; a member model the member experiments did not train is left out."""
    lock = {
        "stages": {
            "frames": {"outs": [{"path": "data/frames", "md5": "new.dir"}]},
            "train@cnn3d": {
                "params": {"params.yaml": {"seed": 0, "models.cnn3d": {"depth": 2}}},
                "deps": [{"path": "data/frames", "md5": "new.dir"}, {"path": "x.py", "md5": "1"}],
            },
            "train@cnn_gru": {
                "params": {"params.yaml": {"seed": 42}},
                "deps": [{"path": "data/frames", "md5": "old.dir"}],
            },
        }
    }
    params = {"params.yaml": {"seed": 0, "models": {"cnn3d": {"depth": 2}}}}
    assert stale_inputs(lock, params, "train@cnn3d") == []
    assert stale_inputs(lock, params, "train@cnn_gru") == ["data/frames", "params.yaml: seed"]
    assert stale_inputs(lock, params, "train@frame_cnn") == ["train@frame_cnn (not in dvc.lock)"]
    assert stale_inputs(lock, {"params.yaml": {"seed": 0}}, "train@cnn3d") == [
        "params.yaml: models.cnn3d"
    ]
    monkeypatch.setattr(
        "pipeline.fold_scores.experiment_stale_inputs",
        lambda rev, stage: stale_inputs(lock, params, stage),  # the lock above as every rev's
    )
    check_trained({"cnn3d": ["fold-0", "fold-1"]})
    with pytest.raises(PipelineError, match="fold-0 did not train cnn_gru: .* data/frames"):
        check_trained({"cnn3d": ["fold-0"], "cnn_gru": ["fold-0"]})
    models = ["frame_cnn", "cnn3d", "cnn_gru"]
    assert member_sources(["a"], ["frame_cnn"], ["m"], models) == {
        "frame_cnn": ["a"],
        "cnn3d": ["m"],
    }
