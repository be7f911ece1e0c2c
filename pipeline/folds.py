"""Cross-validation folds: choose settings on every train + validation clip, not on a
validation split of a dozen clips (docs/scores.md, *Choosing on five folds*).

    python -m pipeline.folds split --folds 5        # folds/fold_0.csv ... fold_4.csv
    dvc exp run -n fold-0 -S dataset.split_file=folds/fold_0.csv -S 'train_seeds=[0,1,2]'
    ...                                                # one experiment per fold and setting
    python -m pipeline.folds score fold-0 fold-1 fold-2 fold-3 fold-4
    python -m pipeline.folds score gru-fold-0 ... gru-fold-4 --models cnn_gru \
        --members-from fold-0 ... fold-4               # one model's setting, with the others

`split` deals the train and validation clips of the last `dvc repro` (`data/clean/splits.csv`,
whether from a split file or the grouped random split) into folds by recording group (a group
is never split), stratified by class; each fold's file holds its part out as validation and
trains on the rest, and the test clips stay test in every fold, so test scores stay comparable
with a fixed split's. `score` reads each experiment's `reports/<model>/probabilities.csv`
through DVC and scores every model, and the ensemble of them pooled as `compare.ensemble`
says, on the held-out clips of all folds together: each clip scored once per seed by networks
that did not train on it (`pipeline.fold_scores`). Test scores are listed too, for the record,
never to choose by. Where the experiments also ran the `baseline` stage on their folds (add it
to each `dvc exp run`'s targets: seconds), the motion logistic regression is scored the same
way, as the row the models have to beat; its C is chosen on each fold's held-out clips, as on
a fixed split's validation clips, so its out-of-fold score is, if anything, too kind to it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from pipeline.atomic import write_text_atomic
from pipeline.config import load_config, resolve
from pipeline.ensemble import ENSEMBLE, ensemble_config
from pipeline.errors import PipelineError
from pipeline.fold_scores import (
    check_same_folds,
    check_trained,
    ensemble_rows,
    experiment_probabilities,
    fold_rows,
    fresh_source,
    member_sources,
    named_folds,
    out_of_fold_scores,
    score_table,
)
from pipeline.logs import setup_logging
from pipeline.probabilities import CLIP_KEYS
from pipeline.stages.baseline import PROBABILITIES_OF
from pipeline.stages.baseline import STAGE as BASELINE_STAGE

log = logging.getLogger(__name__)

BASELINE_ROW = f"baseline_{PROBABILITIES_OF}"  # as named in reports/comparison.csv


def fold_splits(clips: pd.DataFrame, folds: int, seed: int) -> list[pd.DataFrame]:
    """`folds` split tables (clip, label, split) of `clips` (source, label, group, split): the
    test clips test in each; the others dealt into `folds` parts by group, stratified by
    label, part k the validation split of table k and training clips of the others."""
    from sklearn.model_selection import StratifiedGroupKFold

    test = clips[clips["split"] == "test"]
    pool = clips[clips["split"] != "test"].reset_index(drop=True)
    groups_per_class = pool.groupby("label")["group"].nunique()
    if pool["group"].nunique() < folds:
        raise PipelineError(
            f"--folds {folds}: the train and validation clips hold {pool['group'].nunique()} "
            "recording groups, and a group is never split; use fewer folds"
        )
    for label, groups in groups_per_class[groups_per_class < folds].items():
        log.warning(
            "class %s has %d recording groups: %d of %d folds validate none of it",
            label,
            groups,
            folds - groups,
            folds,
        )
    dealer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    tables = []
    for _, held_out in dealer.split(pool, pool["label"], pool["group"]):
        fold = pool.assign(split="train")
        fold.loc[held_out, "split"] = "val"
        table = pd.concat([fold, test])[["source", "label", "split"]]
        tables.append(table.rename(columns={"source": "clip"}))
    return tables


def cleaned_clips(clean_dir: Path) -> pd.DataFrame:
    """The usable clips of the last clean stage: source (path under the dataset root), label,
    group and split."""
    splits_path, probe_path = clean_dir / "splits.csv", clean_dir / "probe.csv"
    for path in (splits_path, probe_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro clean` first")
    splits = pd.read_csv(splits_path)
    sources = pd.read_csv(probe_path, usecols=["path", "source"])
    return splits.merge(sources, on="path", how="left")[["source", "label", "group", "split"]]


def write_fold_files(tables: list[pd.DataFrame], out_dir: Path) -> list[Path]:
    """`out_dir/fold_<k>.csv` for each table, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, table in enumerate(tables):
        path = out_dir / f"fold_{k}.csv"
        write_text_atomic(path, table.to_csv(index=False))
        paths.append(path)
    return paths


def split_command(args: argparse.Namespace) -> None:
    """`split`: the fold files of the last clean stage's clips."""
    config = load_config(args.params)
    if args.folds < 2:
        raise PipelineError(f"--folds {args.folds}: cross-validation needs at least 2 folds")
    clips = cleaned_clips(resolve(config.paths.clean))
    paths = write_fold_files(fold_splits(clips, args.folds, args.seed), resolve(args.out))
    log.info(
        "wrote %d fold files (%s ... %s), %d train + validation clips dealt, %d test clips kept; "
        "run one experiment per file: dvc exp run -S dataset.split_file=%s",
        len(paths),
        paths[0].name,
        paths[-1].name,
        int((clips["split"] != "test").sum()),
        int((clips["split"] == "test").sum()),
        Path(args.out) / "fold_<k>.csv",
    )


def baseline_rows(
    candidates: list[list[str]], reports: str, folds: list[str]
) -> tuple[list[str], pd.DataFrame] | None:
    """The logistic regression's held-out rows (`named_folds`, fold names `folds`) from the first
    of `candidates` (one experiment per fold) that ran the baseline stage on every fold, and
    those experiments; None and a warning when none did or they hold no probabilities of it."""
    source = fresh_source(candidates, BASELINE_STAGE)
    if source is None:
        log.warning(
            "no %s row: the experiments did not run the %s stage on their folds (add `%s` to "
            "each `dvc exp run`'s targets)",
            BASELINE_ROW,
            BASELINE_STAGE,
            BASELINE_STAGE,
        )
        return None
    try:
        tables = experiment_probabilities(source, reports, f"{BASELINE_STAGE}/{PROBABILITIES_OF}")
    except PipelineError as exc:  # a baseline stage older than its probabilities report
        log.warning("no %s row: %s", BASELINE_ROW, exc)
        return None
    return source, named_folds(tables, folds)


def score_command(args: argparse.Namespace) -> None:
    """`score`: out-of-fold scores of each model and of their ensemble."""
    from pipeline.schema.base import MODEL_NAMES

    config = load_config(args.params)
    for experiments in (args.experiments, args.members_from or []):
        given = pd.Series(experiments)
        if given.duplicated().any():
            raise PipelineError(f"{given[given.duplicated()].iloc[0]} is given twice: one per fold")
    sources = member_sources(args.experiments, args.models, args.members_from, MODEL_NAMES)
    check_trained(sources)
    by_model = {
        name: fold_rows(experiments, config.paths.reports, name, args.experiments)
        for name, experiments in sources.items()
    }
    check_same_folds(by_model, sources)
    first = next(iter(by_model.values()))
    classes = [c for c in first.columns if c not in (*CLIP_KEYS, "label", "fold")]
    scores = {
        name: {**out_of_fold_scores(rows, classes), "experiments": sources[name]}
        for name, rows in by_model.items()
    }
    if len(by_model) > 1:
        pooling = ensemble_config(config.compare.ensemble).pooling
        scores[ENSEMBLE] = out_of_fold_scores(ensemble_rows(by_model, classes, pooling), classes)
    reference = {}
    candidates = [args.experiments, args.members_from or []]
    baseline = baseline_rows(candidates, config.paths.reports, args.experiments)
    if baseline is not None:
        source, rows = baseline
        check_same_folds({**by_model, BASELINE_ROW: rows}, {**sources, BASELINE_ROW: source})
        reference[BASELINE_ROW] = {**out_of_fold_scores(rows, classes), "experiments": source}
    shown = {**scores, **reference}
    table = score_table(shown)
    log.info("out-of-fold scores of %s:\n%s", ", ".join(args.experiments), table)
    if args.report:
        import json

        report = resolve(args.report)
        write_text_atomic(report.with_suffix(".md"), table)
        write_text_atomic(report.with_suffix(".json"), json.dumps(shown, indent=2))
    best = max((n for n in scores), key=lambda n: scores[n]["val_macro_f1_mean"])
    log.info(
        "scored %d experiments, %d held-out clips a seed: best out of fold %s (%.3f)",
        len(args.experiments),
        scores[best]["held_out_clips"],
        best,
        scores[best]["val_macro_f1_mean"],
    )


def main(argv: list[str] | None = None) -> None:
    from pipeline.schema.base import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.folds", description="Cross-validation folds: write, score."
    )
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="fold files for dataset.split_file")
    split.add_argument("--folds", type=int, default=5, help="how many (default 5)")
    split.add_argument("--seed", type=int, default=0, help="how groups are dealt (default 0)")
    split.add_argument("--out", default="folds", help="folder of fold_<k>.csv (default folds)")
    score = commands.add_parser("score", help="out-of-fold scores of one experiment per fold")
    score.add_argument("experiments", nargs="+", help="DVC experiment names (or revisions)")
    score.add_argument("--models", nargs="+", choices=MODEL_NAMES, help="default: all three")
    score.add_argument(
        "--members-from",
        nargs="+",
        metavar="EXPERIMENT",
        help="the models not in --models read from these experiments (one per fold, in the "
        "same order): the ensemble of one model's setting with the others as they were",
    )
    score.add_argument("--report", help="also write the table and scores to REPORT.md/.json")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        {"split": split_command, "score": score_command}[args.command](args)
    except (PipelineError, FileNotFoundError) as exc:
        log.error("folds %s failed: %s", args.command, exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
