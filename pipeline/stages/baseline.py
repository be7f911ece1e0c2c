"""Stage `baseline`: the scores a model has to beat, fitted on the cached frames in seconds.

Two classifiers, fitted on the training split only:
- `majority`: the most frequent training class for every clip;
- `motion_logreg`: a logistic regression (balanced class weights) on cheap motion statistics
  of each clip: its frames in grey, downscaled to `baseline.size` squared, and the absolute
  differences of consecutive frames. Its regularisation `C` is chosen on the validation split.

Both are scored on validation and test like the models, and `compare` puts them in the table.
Outputs: `metrics/baseline.json`, `reports/baseline/<name>/{predictions,per_class}.csv`, and the
logistic regression's per-clip probabilities in the models' format,
`reports/baseline/motion_logreg/probabilities.csv`, which `python -m pipeline.folds score`
scores out of fold next to the models.
"""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pandas as pd

from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.config import SPLITS, resolve
from pipeline.data.arrays import load_arrays
from pipeline.evaluate import SCORES, classification_metrics
from pipeline.probabilities import PROBABILITIES_FILE, probability_rows
from pipeline.schema import Params
from pipeline.schema.sections import Baseline, Paths
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


BASELINES = ("majority", "motion_logreg")
STAGE = "baseline"  # its name in dvc.yaml, and its folder under paths.reports
PROBABILITIES_OF = "motion_logreg"  # the baseline whose per-clip probabilities are written
PROBABILITIES_SEED = 0  # fitted once, deterministic: one `seed` in its probabilities.csv


def motion_statistics(frames: np.ndarray, size: int) -> np.ndarray:
    """(clips x N x S x S x 3 uint8) -> (clips x (2N-1)*size*size): grey frames at size x size
    (0..1) followed by the absolute differences of consecutive ones. One clip in memory at a
    time, so `frames` may be a memory map."""
    rows = []
    for clip in frames:
        grey = np.stack(
            [
                cv2.resize(
                    cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA
                )
                for f in clip
            ]
        )
        grey = grey.astype(np.float32) / 255  # N,size,size
        rows.append(np.concatenate([grey.ravel(), np.abs(np.diff(grey, axis=0)).ravel()]))
    return np.stack(rows) if rows else np.zeros((0, (2 * frames.shape[1] - 1) * size * size))


def fit_motion_logreg(x: dict, y: dict, grid: list[float], classes: list[str]):
    """The logistic regression whose C (from `grid`) scores best on validation macro-F1
    (the smaller C on ties), fitted on the training split. Returns (model, C, val scores
    of every C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tried = {}
    best = None
    for c in sorted(float(v) for v in grid):
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        )
        model.fit(x["train"], y["train"])
        score = classification_metrics(y["val"], model.predict(x["val"]), classes)["macro_f1"]
        tried[c] = score
        if best is None or score > tried[best[1]]:
            best = (model, c)
    return best[0], best[1], tried


def logreg_probabilities(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(clips x n_classes) probabilities of the fitted regression; a class the training
    split lacks gets 0."""
    probs = np.zeros((len(x), n_classes))
    probs[:, model.classes_] = model.predict_proba(x)
    return probs


def logreg_probability_rows(model, x: dict, clips: dict, classes: list[str]) -> pd.DataFrame:
    """The regression's validation and test probabilities, a row per clip, as the models
    write theirs, under PROBABILITIES_SEED."""
    return pd.concat(
        probability_rows(
            PROBABILITIES_SEED,
            split,
            clips[split],
            logreg_probabilities(model, x[split], len(classes)),
            classes,
        )
        for split in ("val", "test")
    )


def majority_predictions(y_train: np.ndarray, n: int) -> np.ndarray:
    values, counts = np.unique(y_train, return_counts=True)
    return np.full(n, values[counts.argmax()], dtype=np.int64)


def baseline_scores(cfg: Baseline, paths: Paths) -> dict:
    """Fit both baselines and write their outputs; returns what goes to metrics/baseline.json."""
    frames_dir = resolve(paths.frames)
    classes = json.loads((frames_dir / "classes.json").read_text())
    x, y, clips = {}, {}, {}
    for split in SPLITS:
        frames, labels = load_arrays(frames_dir / split, "frames", "labels", mmap_mode="r")
        x[split], y[split] = motion_statistics(frames, cfg.size), np.asarray(labels)
        clips[split] = pd.read_csv(frames_dir / split / "clips.csv")
    logreg, c, tried = fit_motion_logreg(x, y, cfg.C, classes)
    predict = {
        "majority": lambda split: majority_predictions(y["train"], len(y[split])),
        "motion_logreg": lambda split: logreg.predict(x[split]),
    }
    summary = {}
    with atomic_dir(resolve(paths.reports) / STAGE) as tmp:
        for name in BASELINES:
            val = classification_metrics(y["val"], predict[name]("val"), classes)
            y_pred = predict[name]("test")
            test = classification_metrics(y["test"], y_pred, classes)
            summary[name] = {
                **{k: test[k] for k in SCORES},
                **{f"val_{k}": val[k] for k in SCORES},
                "test_clips": int(len(y["test"])),
                "train_clips": int(len(y["train"])),
            }
            (tmp / name).mkdir()
            clips["test"].assign(
                actual=[classes[i] for i in y["test"]], predicted=[classes[i] for i in y_pred]
            ).to_csv(tmp / name / "predictions.csv", index=False)
            pd.DataFrame(test["per_class"]).T.rename_axis("class").reset_index().to_csv(
                tmp / name / "per_class.csv", index=False
            )
        rows = logreg_probability_rows(logreg, x, clips, classes)
        rows.to_csv(tmp / PROBABILITIES_OF / PROBABILITIES_FILE, index=False)
    summary["motion_logreg"]["C"] = c
    summary["motion_logreg"]["val_macro_f1_by_C"] = {str(k): round(v, 4) for k, v in tried.items()}
    write_json_atomic(resolve(paths.metrics) / "baseline.json", summary)
    log.info(
        "baseline: majority class test macro-F1 %.3f; motion logistic regression (C=%g, "
        "chosen on validation) val %.3f, test %.3f",
        summary["majority"]["macro_f1"],
        c,
        summary["motion_logreg"]["val_macro_f1"],
        summary["motion_logreg"]["macro_f1"],
    )
    return summary


def run(config: Params) -> dict:
    """The stage: `baseline_scores` with the config's sections."""
    return baseline_scores(config.baseline, config.paths)


def main(argv: list[str] | None = None) -> None:
    stage_cli(
        "baseline", __doc__.splitlines()[0], lambda p, a: baseline_scores(p.baseline, p.paths), argv
    )


if __name__ == "__main__":
    main()
