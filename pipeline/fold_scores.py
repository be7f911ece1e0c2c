"""Out-of-fold scores (`python -m pipeline.folds score`): each model's, and its ensemble's,
on the validation clips of one experiment per fold, read through DVC from each experiment's
`reports/<model>/probabilities.csv`; with `--members-from`, the ensemble's other members from
other experiments of the same folds.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from pipeline.ensemble import aligned_probabilities, pooled_probabilities
from pipeline.errors import PipelineError
from pipeline.evaluate import classification_metrics
from pipeline.experiment_stages import experiment_stale_inputs, train_stage
from pipeline.probabilities import PROBABILITIES_FILE

log = logging.getLogger(__name__)


def experiment_probabilities(experiments: list[str], reports: str, name: str) -> dict:
    """{experiment: its `reports/<name>/probabilities.csv`}, read through DVC (an experiment
    name, a branch, a tag or a commit; the files come from the local DVC cache)."""
    import dvc.api

    path = f"{reports}/{name}/{PROBABILITIES_FILE}"
    tables = {}
    for rev in experiments:
        try:
            with dvc.api.open(path, rev=rev) as handle:
                tables[rev] = pd.read_csv(handle)
        except Exception as exc:  # dvc raises several kinds for a missing rev or file
            raise PipelineError(f"experiment {rev!r}: cannot read {path} ({exc})") from exc
    return tables


def held_out_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every experiment's rows with a `fold` column; a validation clip held out by two
    experiments for one seed, or seeds that differ between them, is a PipelineError."""
    seeds = {rev: sorted(set(t["seed"])) for rev, t in tables.items()}
    if len({tuple(s) for s in seeds.values()}) > 1:
        raise PipelineError(f"the experiments were trained with different seeds: {seeds}")
    rows = pd.concat([t.assign(fold=rev) for rev, t in tables.items()], ignore_index=True)
    val = rows[rows["split"] == "val"]
    twice = val[val.duplicated(["seed", "path"], keep=False)]
    if len(twice):
        clip = twice.iloc[0]
        folds = sorted(set(twice[twice["path"] == clip["path"]]["fold"]))
        raise PipelineError(
            f"{clip['path']} is a validation clip of {folds}: score the folds of one "
            "`python -m pipeline.folds split`, one experiment each"
        )
    return rows


def fold_rows(experiments: list[str], reports: str, name: str, folds: list[str]) -> pd.DataFrame:
    """Model `name`'s held-out rows (`held_out_rows`) from `experiments`, one per fold, their
    `fold` named by `folds` (the scored experiments, in the same order), so that members read
    from other experiments of the same fold files pool fold by fold."""
    return named_folds(experiment_probabilities(experiments, reports, name), folds)


def named_folds(tables: dict[str, pd.DataFrame], folds: list[str]) -> pd.DataFrame:
    """`held_out_rows` of `tables` ({experiment: its rows}, one per fold, in fold order), their
    `fold` named by `folds`."""
    rows = held_out_rows(tables)
    return rows.assign(fold=rows["fold"].map(dict(zip(tables, folds))))


def check_same_folds(by_model: dict[str, pd.DataFrame], sources: dict[str, list[str]]) -> None:
    """Every model holds out the same validation clips in each fold: a PipelineError naming the
    fold's two experiments when not (members read from experiments of other fold files, or in
    another order). `sources`: each model's experiments, one per fold, in fold order."""
    held_out = {
        name: rows[rows["split"] == "val"].groupby("fold")["path"].agg(frozenset)
        for name, rows in by_model.items()
    }
    first = next(iter(held_out))
    folds = sources[first]  # the fold names (`fold_rows`)
    for name in held_out:
        for k, fold in enumerate(folds):
            if held_out[name].get(fold) != held_out[first].get(fold):
                raise PipelineError(
                    f"{sources[first][k]} ({first}) and {sources[name][k]} ({name}) hold out "
                    "other validation clips: give --members-from the experiments of the same "
                    "fold files, in the same order"
                )


def scores_of(rows: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Macro-F1 and log-loss of probability rows (label, one column per class)."""
    from sklearn.metrics import log_loss

    y_true = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    probs = rows[classes].to_numpy(dtype=float)
    probs = probs / probs.sum(axis=1, keepdims=True)  # written rounded to 6 digits
    macro_f1 = classification_metrics(y_true, probs.argmax(axis=1), classes)["macro_f1"]
    loss = log_loss(y_true, np.clip(probs, 1e-12, 1), labels=list(range(len(classes))))
    return {"macro_f1": macro_f1, "log_loss": float(loss)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def out_of_fold_scores(rows: pd.DataFrame, classes: list[str]) -> dict:
    """Per seed, the held-out clips of all folds scored together; per fold and seed, its own
    validation and test macro-F1."""
    per_seed = {
        int(seed): scores_of(g[g["split"] == "val"], classes) for seed, g in rows.groupby("seed")
    }
    by_fold = rows.groupby(["fold", "seed"])
    fold_val = [scores_of(g[g["split"] == "val"], classes)["macro_f1"] for _, g in by_fold]
    fold_test = [scores_of(g[g["split"] == "test"], classes)["macro_f1"] for _, g in by_fold]
    val_mean, val_std = mean_std([s["macro_f1"] for s in per_seed.values()])
    test_mean, test_std = mean_std(fold_test)
    return {
        "val_by_seed": per_seed,
        "val_macro_f1_mean": val_mean,
        "val_macro_f1_std": val_std,
        "val_log_loss_mean": float(np.mean([s["log_loss"] for s in per_seed.values()])),
        "fold_val_macro_f1": fold_val,
        "test_macro_f1_mean": test_mean,
        "test_macro_f1_std": test_std,
        "held_out_clips": int((rows["split"] == "val").sum() // len(per_seed)),
    }


def ensemble_rows(
    by_model: dict[str, pd.DataFrame], classes: list[str], pooling: str
) -> pd.DataFrame:
    """The members' rows pooled clip by clip with equal weights, fold by fold."""
    pooled = []
    for fold in by_model[next(iter(by_model))]["fold"].unique():
        tables = {m: t[t["fold"] == fold].drop(columns="fold") for m, t in by_model.items()}
        clips, probs = aligned_probabilities(tables, classes)
        weights = np.full(len(tables), 1 / len(tables))
        pooled.append(
            pd.concat(
                [
                    clips,
                    pd.DataFrame(pooled_probabilities(weights, probs, pooling), columns=classes),
                ],
                axis=1,
            ).assign(fold=fold)
        )
    return pd.concat(pooled, ignore_index=True)


def score_table(scores: dict[str, dict]) -> str:
    """The scores as a Markdown table, a row per model."""
    lines = [
        "| model | out-of-fold val macro-F1 (per seed) | val log-loss | per fold and seed: val "
        "| test (folds x seeds) |",
        "|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        seeds = ", ".join(f"{v['macro_f1']:.2f}" for v in s["val_by_seed"].values())
        folds = s["fold_val_macro_f1"]
        fold_mean, fold_std = mean_std(folds)
        lines.append(
            f"| {name} | {s['val_macro_f1_mean']:.3f} ± {s['val_macro_f1_std']:.3f} ({seeds}) "
            f"| {s['val_log_loss_mean']:.3f} | {fold_mean:.3f} ± {fold_std:.3f} (lowest "
            f"{min(folds):.2f}) | {s['test_macro_f1_mean']:.3f} ± {s['test_macro_f1_std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def trained_in(experiment: str, name: str) -> bool:
    """Whether `experiment` trained model `name` with its own settings and data (its outputs
    of the model are not those of the commit or workspace it started from)."""
    return not experiment_stale_inputs(experiment, train_stage(name))


def check_trained(sources: dict[str, list[str]]) -> None:
    """Every model's experiments trained it with their own settings and data: a
    PipelineError naming the first that did not, and what differs."""
    for name, experiments in sources.items():
        for rev in experiments:
            stale = experiment_stale_inputs(rev, train_stage(name))
            if stale:
                raise PipelineError(
                    f"{rev} did not train {name}: its dvc.lock entry {train_stage(name)} "
                    f"differs from the experiment in {', '.join(stale[:4])} (the outputs "
                    "come from the commit or workspace it started from); give the "
                    f"experiments that ran {train_stage(name)}"
                )


def fresh_source(candidates: list[list[str]], stage: str) -> list[str] | None:
    """The first of `candidates` (lists of one experiment per fold) whose every experiment
    ran `stage` on its own fold, with its own settings and code; None when none did."""
    for experiments in candidates:
        if experiments and not any(experiment_stale_inputs(rev, stage) for rev in experiments):
            return experiments
    return None


def member_sources(
    experiments: list[str],
    models: list[str] | None,
    members_from: list[str] | None,
    all_models,
) -> dict[str, list[str]]:
    """{model: the experiments (one per fold) its probabilities are read from}: `models` (all
    by default) from `experiments`; with `members_from`, every other model those hold, so
    one model's setting is scored with the ensemble's other members as they were (a model
    they did not train is logged and left out)."""
    chosen = list(models or all_models)
    sources = {name: experiments for name in chosen}
    if members_from is None:
        return sources
    if len(members_from) != len(experiments):
        raise PipelineError(
            f"--members-from names {len(members_from)} experiments for {len(experiments)} "
            "folds: one per fold, in the order of the scored ones"
        )
    others = [name for name in all_models if name not in chosen]
    if not others:
        raise PipelineError(
            "--members-from reads the models not in --models, and --models names them all: "
            "give --models the ones to score from the experiments (e.g. --models frame_cnn)"
        )
    held = [name for name in others if trained_in(members_from[0], name)]
    if not held:
        raise PipelineError(
            f"--members-from: {members_from[0]} trained none of {', '.join(others)} (the "
            "models not in --models) to pool with"
        )
    for name in others:
        if name not in held:
            log.warning("%s: not trained in %s, not a member", name, members_from[0])
    log.info(
        "%s from %s; %s from %s",
        ", ".join(chosen),
        ", ".join(experiments),
        ", ".join(held),
        ", ".join(members_from),
    )
    return {**sources, **{name: members_from for name in held}}
