"""Cross-validation folds (`python -m pipeline.folds`): the fold files deal recording groups
into folds, and the scorer scores the held-out clips of real DVC experiments, one per fold."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import project_copy, run

from pipeline.errors import PipelineError
from pipeline.fold_scores import held_out_rows, member_sources
from pipeline.folds import fold_splits


def clip_table() -> pd.DataFrame:
    """Three classes of 4-6 recording groups, a group of two clips each in train/val, and
    test clips that must stay test."""
    rows = []
    for label, groups in (("shot", 6), ("pass", 5), ("defence", 4)):
        for g in range(groups):
            split = "test" if g == 0 else ("val" if g == 1 else "train")
            rows += [
                (f"{label}/{label}_{g}_act{k}.avi", label, f"{label}_{g}", split) for k in (1, 2)
            ]
    return pd.DataFrame(rows, columns=["source", "label", "group", "split"])


def test_folds_hold_out_every_clip_once_keep_groups_together_and_test_as_test():
    clips = clip_table()
    tables = fold_splits(clips, folds=3, seed=0)
    assert len(tables) == 3
    test = set(clips.loc[clips["split"] == "test", "source"])
    pool = set(clips["source"]) - test
    held_out = []
    for table in tables:
        assert list(table.columns) == ["clip", "label", "split"]
        assert set(table["clip"]) == set(clips["source"])  # every clip listed in every fold
        assert set(table.loc[table["split"] == "test", "clip"]) == test
        val = table[table["split"] == "val"]
        held_out += list(val["clip"])
        groups = clips.set_index("source").loc[val["clip"], "group"]
        in_train = clips.set_index("source").loc[
            table.loc[table["split"] == "train", "clip"], "group"
        ]
        assert not set(groups) & set(in_train), "a recording group on both sides of a fold"
        assert set(val["label"]) == {"shot", "pass", "defence"}  # stratified: >= 3 groups each
    assert sorted(held_out) == sorted(pool)  # each train/val clip held out exactly once
    assert [t.equals(u) for t, u in zip(tables, fold_splits(clips, folds=3, seed=0))] == [True] * 3


def test_more_folds_than_groups_is_refused_naming_the_option():
    with pytest.raises(PipelineError, match="--folds 20: .* 12 recording groups"):
        fold_splits(clip_table(), folds=20, seed=0)


@pytest.mark.slow  # four `dvc exp run`s at test size (~5 min); CI runs it
def test_scores_held_out_clips_of_one_experiment_per_fold(tmp_path):
    """The documented loop on the tiny project: clean, write 2 folds (committed), one
    `dvc exp run` per fold file training cnn3d and cnn_gru and fitting the baseline, then
    `score` them. Each fold's own validation and test macro-F1 equal what its stage wrote to
    metrics/ (the logistic regression's too, a row that is never the best); the out-of-fold
    score covers every train + validation clip once; one model's setting, trained on the same
    folds alone, is scored with the other members and the baseline read from the first
    experiments (`--members-from`), and without them it has no baseline row, said so; members
    of other folds are refused; a model read from experiments that did not train it, and a
    fold given twice, are refused."""
    import dvc.api

    repo = tmp_path / "project"
    repo.mkdir()
    env = project_copy(repo, [])
    python = [sys.executable, "-m", "pipeline.folds"]
    run(["dvc", "repro", "clean"], repo, env)
    run([*python, "split", "--folds", "2"], repo, env)
    run(["git", "add", "folds"], repo, env)
    run(["git", "commit", "-q", "-m", "folds"], repo, env)
    pool = pd.read_csv(repo / "data" / "clean" / "splits.csv").query("split != 'test'")

    def fold_experiment(name: str, k: int, *settings: str) -> None:
        split_file = f"dataset.split_file=folds/fold_{k}.csv"
        run(["dvc", "exp", "run", "-n", f"{name}-{k}", "-S", split_file, *settings], repo, env)

    for k in (0, 1):
        fold_experiment("fold", k, "train@cnn3d", "train@cnn_gru", "baseline")
    report = repo / "reports" / "folds"
    out = run(
        [
            *python,
            "score",
            "fold-0",
            "fold-1",
            "--models",
            "cnn3d",
            "cnn_gru",
            "--report",
            "reports/folds",
        ],
        repo,
        env,
    )
    scores = json.loads(report.with_suffix(".json").read_text())
    assert set(scores) == {"cnn3d", "cnn_gru", "ensemble", "baseline_motion_logreg"}
    table = report.with_suffix(".md").read_text()
    assert "| ensemble |" in table and "| baseline_motion_logreg |" in table
    assert "best out of fold" in out and "best out of fold baseline" not in out

    def fold_metrics(name: str, rev: str) -> dict:
        """metrics/<name>.json of experiment `rev`; the baseline's logistic regression row."""
        file = "baseline" if name == "baseline_motion_logreg" else name
        metrics = json.loads(dvc.api.read(f"metrics/{file}.json", repo=str(repo), rev=rev))
        return metrics["motion_logreg"] if file == "baseline" else metrics

    for name in ("cnn3d", "cnn_gru", "baseline_motion_logreg"):
        assert scores[name]["held_out_clips"] == len(pool)
        per_fold = [fold_metrics(name, f"fold-{k}") for k in (0, 1)]
        assert scores[name]["fold_val_macro_f1"] == pytest.approx(
            [m["val_macro_f1"] for m in per_fold], abs=1e-9
        )
        assert scores[name]["test_macro_f1_mean"] == pytest.approx(
            sum(m["macro_f1"] for m in per_fold) / 2, abs=1e-9
        )
    # one model's setting on the same folds, the ensemble's other members as they were
    for k in (0, 1):
        fold_experiment("wide-fold", k, "-S", "models.cnn_gru.dropout=0.0", "train@cnn_gru")
    wide = ["wide-fold-0", "wide-fold-1"]
    run(
        [
            *python,
            "score",
            *wide,
            "--models",
            "cnn_gru",
            "--members-from",
            "fold-0",
            "fold-1",
            "--report",
            "reports/wide",
        ],
        repo,
        env,
    )
    mixed = json.loads((repo / "reports" / "wide.json").read_text())
    # the baseline from the experiments that ran it on these folds: the members'
    assert set(mixed) == {"cnn3d", "cnn_gru", "ensemble", "baseline_motion_logreg"}
    assert mixed["baseline_motion_logreg"] == scores["baseline_motion_logreg"]
    assert mixed["cnn_gru"]["experiments"] == wide
    assert mixed["cnn3d"]["experiments"] == ["fold-0", "fold-1"]
    assert mixed["cnn_gru"]["fold_val_macro_f1"] == pytest.approx(
        [
            json.loads(dvc.api.read("metrics/cnn_gru.json", repo=str(repo), rev=rev))[
                "val_macro_f1"
            ]
            for rev in wide
        ],
        abs=1e-9,
    )
    assert mixed["cnn3d"]["val_by_seed"] == scores["cnn3d"]["val_by_seed"]

    def refused(*arguments: str) -> str:
        """`score`'s error output for arguments it must refuse (exit status 2)."""
        proc = subprocess.run(
            [*python, "score", *arguments], cwd=repo, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        return proc.stderr

    alone = run([*python, "score", *wide, "--models", "cnn_gru"], repo, env)
    assert "no baseline_motion_logreg row: the experiments did not run the baseline" in alone
    swapped = refused(*wide, "--models", "cnn_gru", "--members-from", "fold-1", "fold-0")
    assert "wide-fold-0 (cnn_gru) and fold-1 (cnn3d) hold out other" in swapped
    untrained = refused(*wide, "--models", "cnn3d")  # wide-fold-* trained cnn_gru alone
    assert "wide-fold-0 did not train cnn3d: its dvc.lock entry train@cnn3d" in untrained
    assert "fold-0 is given twice" in refused("fold-0", "fold-0", "--models", "cnn3d")


def test_a_clip_held_out_by_two_experiments_or_other_seeds_are_refused():
    """Scores of folds that overlap (or were trained with other seeds) would count a clip
    twice: refused, naming the clip and the experiments."""

    def rows(seed, val_paths):
        return pd.DataFrame(
            {
                "seed": seed,
                "split": "val",
                "path": val_paths,
                "label": "shot",
                "shot": 0.9,
                "pass": 0.1,
            }
        )

    held_out_rows({"a": rows(0, ["x.avi", "y.avi"]), "b": rows(0, ["z.avi"])})  # disjoint: fine
    with pytest.raises(PipelineError, match=r"y.avi is a validation clip of \['a', 'b'\]"):
        held_out_rows({"a": rows(0, ["x.avi", "y.avi"]), "b": rows(0, ["y.avi"])})
    with pytest.raises(PipelineError, match="different seeds"):
        held_out_rows({"a": rows(0, ["x.avi"]), "b": rows(1, ["y.avi"])})


def test_members_from_needs_one_experiment_per_fold_and_a_model_left_to_read():
    models = ["frame_cnn", "cnn3d", "cnn_gru"]
    assert member_sources(["a", "b"], ["cnn3d"], None, models) == {"cnn3d": ["a", "b"]}
    with pytest.raises(PipelineError, match="--members-from names 1 experiments for 2 folds"):
        member_sources(["a", "b"], ["cnn3d"], ["c"], models)
    with pytest.raises(PipelineError, match="--models names them all"):
        member_sources(["a", "b"], None, ["c", "d"], models)
