"""The ensemble row: the models' class probabilities averaged clip by clip.

Each train stage writes `reports/<model>/probabilities.csv`, one row per validation and test
clip and training seed (columns `seed`, `split`, `path`, `label`, then one probability per
class). The compare stage averages the members' probabilities (`compare.ensemble`): with equal
weights, or with the weights on a grid over the simplex that minimise the log-loss on the
validation clips. Fitted weights see the validation clips, so the ensemble's validation score
is then computed leave-one-out (each clip scored with weights fitted on the others) and stays
comparable with the single models' when the champion is chosen. Each seed of `train_seeds`
gets its own average of the models trained with that seed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError
from pipeline.evaluate import (
    SCORES,
    classification_metrics,
    seed_spread,
    write_prediction_reports,
)
from pipeline.probabilities import CLIP_KEYS, PROBABILITIES_FILE
from pipeline.schema.base import MODEL_NAMES
from pipeline.schema.sections import Ensemble

ENSEMBLE = "ensemble"  # the row's name, its reports folder and its logged model's name
POOLINGS = get_args(Ensemble.model_fields["pooling"].annotation)  # compare.ensemble.pooling


@dataclass(frozen=True)
class EnsembleConfig:
    """`compare.ensemble`: which models, and how they are weighted."""

    members: list[str]  # [] or one model: no ensemble row
    weights: str  # equal | fitted
    weight_step: float  # the grid of fitted weights: multiples of this, summing to 1
    pooling: str  # arithmetic | geometric


def ensemble_config(section: Ensemble) -> EnsembleConfig:
    """`compare.ensemble` (the schema has checked it): its members, all models when null."""
    members = list(MODEL_NAMES) if section.members is None else list(section.members)
    return EnsembleConfig(members, section.weights, section.weight_step, section.pooling)


def pooled_probabilities(weights: np.ndarray, probs: np.ndarray, pooling: str) -> np.ndarray:
    """The members' probabilities (members x clips x classes) pooled with `weights` (members,
    or weight vectors x members) into (clips x classes, or weight vectors x clips x classes):
    `arithmetic`, sum_m w_m p_m; `geometric`, prod_m p_m ** w_m renormalised over the
    classes (a class that one member all but rules out stays unlikely)."""
    if pooling == "arithmetic":
        return np.einsum("...m,mnc->...nc", weights, probs)
    logs = np.einsum("...m,mnc->...nc", weights, np.log(np.clip(probs, 1e-12, None)))
    pooled = np.exp(logs - logs.max(axis=-1, keepdims=True))
    return pooled / pooled.sum(axis=-1, keepdims=True)


def aligned_probabilities(
    tables: dict[str, pd.DataFrame], classes: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """(clips: seed, split, path, label; members x clips x classes probabilities), the clips
    of the first member in its order, for the seeds every member was trained with. A member
    that lacks a clip or a class, or has others, is a PipelineError naming it."""
    names = list(tables)
    seeds = sorted(set.intersection(*(set(t["seed"]) for t in tables.values())))
    if not seeds:
        raise PipelineError(f"the ensemble's members {names} share no training seed")
    first = tables[names[0]]
    clips = first[first["seed"].isin(seeds)][[*CLIP_KEYS, "label"]].reset_index(drop=True)
    stacked = []
    for name, table in tables.items():
        missing = [c for c in classes if c not in table]
        table = table[table["seed"].isin(seeds)]
        aligned = clips[CLIP_KEYS].merge(table, on=CLIP_KEYS, how="left") if not missing else None
        if missing or len(table) != len(clips) or aligned[classes].isna().any(axis=None):
            raise PipelineError(
                f"{name}'s {PROBABILITIES_FILE} does not cover the validation and test clips "
                f"and classes of {names[0]}'s (missing classes: {missing}); retrain both on "
                "the same data (`dvc repro`)"
            )
        stacked.append(aligned[classes].to_numpy(dtype=float))
    return clips, np.stack(stacked)


def simplex_grid(members: int, step: float) -> np.ndarray:
    """Every weight vector of `members` multiples of `step` summing to 1 (stars and bars),
    the one nearest to equal weights first, so that ties keep the plainest average."""
    parts = round(1 / step)
    grid = np.array(
        [
            np.diff([-1, *bars, parts + members - 1]) - 1
            for bars in itertools.combinations(range(parts + members - 1), members - 1)
        ],
        dtype=float,
    )
    grid /= parts
    return grid[np.argsort(((grid - 1 / members) ** 2).sum(axis=1), kind="stable")]


def clip_log_losses(pooled: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(weight vectors x clips) log-loss of each clip's pooled probabilities (weight vectors x
    clips x classes)."""
    picked = pooled[:, np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, 1e-12, None))


def first_minimum(totals: np.ndarray) -> np.ndarray:
    """Per column of (weight vectors x ...) `totals`, the first row within rounding of the
    column's minimum: equal losses (up to float error) keep the plainer weights."""
    lowest = totals.min(axis=0)
    return (totals <= lowest + 1e-9 * np.maximum(1.0, np.abs(lowest))).argmax(axis=0)


def fitted_weights(probs: np.ndarray, labels: np.ndarray, step: float, pooling: str) -> np.ndarray:
    """The grid's weights with the lowest total log-loss on these clips."""
    grid = simplex_grid(len(probs), step)
    losses = clip_log_losses(pooled_probabilities(grid, probs, pooling), labels)
    return grid[first_minimum(losses.sum(axis=1))]


def leave_one_out_probabilities(
    probs: np.ndarray, labels: np.ndarray, step: float, pooling: str
) -> np.ndarray:
    """(clips x classes): each clip pooled with the weights fitted on all the other clips,
    so that a score of fitted weights on the clips they were fitted on is not optimistic."""
    grid = simplex_grid(len(probs), step)
    pooled = pooled_probabilities(grid, probs, pooling)
    losses = clip_log_losses(pooled, labels)
    best = first_minimum(losses.sum(axis=1, keepdims=True) - losses)
    return pooled[best, np.arange(len(labels))]


@dataclass
class SeedEnsemble:
    """The ensemble of the models trained with one seed."""

    seed: int
    weights: dict[str, float]
    val_probs: np.ndarray  # leave-one-out when the weights were fitted
    test_probs: np.ndarray
    test_clips: pd.DataFrame  # path, label of the test clips, in the order of test_probs
    val_scores: dict
    test_scores: dict


def seed_ensembles(
    clips: pd.DataFrame, probs: np.ndarray, classes: list[str], config: EnsembleConfig
) -> list[SeedEnsemble]:
    """The ensemble for every seed in `clips`, scored on validation and test."""
    index = {c: i for i, c in enumerate(classes)}
    pooling, step = config.pooling, config.weight_step
    out = []
    for seed in sorted(clips["seed"].unique()):
        val = ((clips["seed"] == seed) & (clips["split"] == "val")).to_numpy()
        test = ((clips["seed"] == seed) & (clips["split"] == "test")).to_numpy()
        y_val = clips.loc[val, "label"].map(index).to_numpy()
        y_test = clips.loc[test, "label"].map(index).to_numpy()
        if config.weights == "fitted":
            weights = fitted_weights(probs[:, val], y_val, step, pooling)
            val_probs = leave_one_out_probabilities(probs[:, val], y_val, step, pooling)
        else:
            weights = np.full(len(probs), 1 / len(probs))
            val_probs = pooled_probabilities(weights, probs[:, val], pooling)
        test_probs = pooled_probabilities(weights, probs[:, test], pooling)
        out.append(
            SeedEnsemble(
                seed=int(seed),
                weights={m: round(float(w), 4) for m, w in zip(config.members, weights)},
                val_probs=val_probs,
                test_probs=test_probs,
                test_clips=clips.loc[test, ["path", "label"]].reset_index(drop=True),
                val_scores=classification_metrics(y_val, val_probs.argmax(axis=1), classes),
                test_scores=classification_metrics(y_test, test_probs.argmax(axis=1), classes),
            )
        )
    return out


def ensemble_summary(ensembles: list[SeedEnsemble], main: SeedEnsemble, members: dict) -> dict:
    """The ensemble's `metrics/<model>.json`-like summary: `main`'s scores, the members'
    summed costs (`members`: name -> its comparison row or metrics), and mean ± std over
    seeds when several."""
    summary = {k: main.test_scores[k] for k in SCORES}
    summary.update({f"val_{k}": main.val_scores[k] for k in SCORES})
    for cost in ("params", "train_time_s", "inference_ms_per_clip"):
        summary[cost] = float(sum(m.get(cost, np.nan) for m in members.values()))
    summary["test_clips"] = len(main.test_clips)
    if len(ensembles) > 1:
        summary.update(seed_spread([{k: e.test_scores[k] for k in SCORES} for e in ensembles]))
    return summary


def write_ensemble_reports(
    folder: Path, ensembles: list[SeedEnsemble], main: SeedEnsemble, classes: list[str]
) -> None:
    """`folder` (atomically): `main`'s test reports as a model's (confusion matrix,
    classification report, per-class scores, predictions) and `weights.json`, the members'
    weights per seed."""
    index = {c: i for i, c in enumerate(classes)}
    with atomic_dir(folder) as tmp:
        write_prediction_reports(
            tmp,
            ENSEMBLE,
            main.test_clips["label"].map(index).to_numpy(),
            main.test_probs,
            classes,
            main.test_scores["per_class"],
            main.test_clips,
        )
        weights = {str(e.seed): e.weights for e in ensembles}
        (tmp / "weights.json").write_text(json.dumps(weights, indent=2) + "\n")
