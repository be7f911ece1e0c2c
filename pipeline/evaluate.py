"""Test-set metrics with predictions aligned to labels, and the figures and reports for them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from pipeline.atomic import atomic_dir  # noqa: E402

# the headline scores `classification_metrics` returns (and the comparison reports)
SCORES = ["accuracy", "balanced_accuracy", "macro_f1"]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support.

    `y_true[i]` and `y_pred[i]` must describe the same clip: callers predict on the test arrays
    in their stored order and never shuffle between predicting and reading labels.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    labels = list(range(len(classes)))
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        # macro over the classes present in the test split
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
    }


def seed_spread(scores: list[dict]) -> dict:
    """Over the seeds' test scores (one dict of scores per seed): `seeds`, and each score's
    `<score>_mean` and `<score>_std` (sample standard deviation)."""
    table = pd.DataFrame(scores)
    out = {"seeds": len(scores)}
    for key in table:
        out[f"{key}_mean"] = float(table[key].mean())
        out[f"{key}_std"] = float(table[key].std(ddof=1))
    return out


def report_text(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    return classification_report(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        target_names=classes,
        zero_division=0,
        digits=3,
    )


def confusion_figure(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], title: str):
    """A labelled confusion-matrix figure (rows: true class, columns: predicted)."""
    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 1.0 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    fig.tight_layout()
    return fig


def scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 from a confusion matrix (rows: true class),
    over the classes present in the true labels, as classification_metrics defines them."""
    support = cm.sum(axis=1)
    present = support > 0
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(
        2 * precision * recall,
        precision + recall,
        out=np.zeros_like(tp),
        where=(precision + recall) > 0,
    )
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
    }


def bootstrap_intervals(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of accuracy, balanced accuracy and macro-F1: test clips
    are resampled with replacement (pairs kept together) and each score recomputed."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if len(y_true) == 0:
        raise ValueError("no test predictions to bootstrap")
    rng = np.random.default_rng(seed)
    pairs = y_true * num_classes + y_pred
    draws = {k: np.empty(samples) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    for b in range(samples):
        sample = pairs[rng.integers(0, len(pairs), len(pairs))]
        cm = np.bincount(sample, minlength=num_classes**2).reshape(num_classes, num_classes)
        for key, value in scores_from_confusion(cm).items():
            draws[key][b] = value
    tail = (1 - confidence) / 2 * 100
    return {
        k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
        for k, v in draws.items()
    }


def misclassified_figure(frames: np.ndarray, predictions: pd.DataFrame, max_clips: int, title: str):
    """The gallery of misclassified test clips, most confident mistakes first: one row per
    clip, its cached frames left to right (`frames`: clips x N x S x S x 3 RGB, in the order
    of `predictions`), titled with the file, true -> predicted action and the confidence; at
    most `max_clips` rows. A figure that says so when no clip is misclassified."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    shown = wrong.sort_values("confidence", ascending=False, kind="stable").head(max_clips)
    n = frames.shape[1]
    if shown.empty:
        fig, ax = plt.subplots(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{title}: every test clip is classified right", ha="center")
        return fig
    size = (1.3 * n, 1.55 * len(shown) + 0.4)  # inches: a row per clip, then the title
    fig, axes = plt.subplots(len(shown), n, figsize=size, squeeze=False)
    for row, (index, clip) in zip(axes, shown.iterrows()):
        for frame, ax in zip(frames[predictions.index.get_loc(index)], row):
            ax.imshow(frame)
            ax.set_axis_off()
        row[0].set_title(
            f"{clip['path']}: {clip['actual']} -> {clip['predicted']} ({clip['confidence']:.2f})",
            loc="left",
            fontsize=8,
        )
    height = fig.get_figheight()
    fig.suptitle(
        f"{title}: {len(shown)} of {len(wrong)} misclassified test clips, most confident first",
        y=1 - 0.12 / height,
    )
    # not tight_layout: it would shrink the frames to fit each row's title into one column
    top = 1 - 0.65 / height
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.3)
    return fig


def write_prediction_reports(
    folder: Path,
    name: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    per_class: dict,
    test_clips: pd.DataFrame,
) -> pd.DataFrame:
    """Write into `folder` the test confusion matrix, classification report, per-class scores
    (`classification_metrics(...)["per_class"]`) and predictions (`predictions.csv`: each test
    clip with its actual and predicted action and the confidence). Returns the predictions."""
    y_pred = probs.argmax(axis=1)
    predictions = test_clips.assign(
        actual=[classes[i] for i in y_true],
        predicted=[classes[i] for i in y_pred],
        confidence=probs.max(axis=1).round(4),
    )
    fig = confusion_figure(y_true, y_pred, classes, f"{name}: test confusion matrix")
    fig.savefig(folder / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    (folder / "classification_report.txt").write_text(report_text(y_true, y_pred, classes))
    pd.DataFrame(per_class).T.rename_axis("class").reset_index().to_csv(
        folder / "per_class.csv", index=False
    )
    predictions.to_csv(folder / "predictions.csv", index=False)
    return predictions


def write_test_reports(
    reports: Path,
    name: str,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    per_class: dict,
    test_clips: pd.DataFrame,
    history: dict,
    frames: np.ndarray,
    max_clips: int,
) -> list[Path]:
    """Write `reports` (one folder, atomically): the prediction reports above, the learning
    curves and the gallery of misclassified clips (misclassified.png). Returns the files
    written."""
    with atomic_dir(reports) as tmp:
        predictions = write_prediction_reports(
            tmp, name, y_true, probs, classes, per_class, test_clips
        )
        fig = misclassified_figure(frames, predictions, max_clips, name)
        fig.savefig(tmp / "misclassified.png", dpi=100)
        plt.close(fig)
        curves = pd.DataFrame(history).rename_axis("epoch").reset_index()
        curves.drop(columns=["learning_rate"], errors="ignore").to_csv(
            tmp / "history.csv", index=False
        )
        written = sorted(p.name for p in tmp.iterdir())
    return [reports / file for file in written]
