"""Metrics are computed on aligned (label, prediction) pairs and match hand-computed values."""

import numpy as np
import pytest

from pipeline.evaluate import (
    classification_metrics,
    confusion_figure,
    misclassified_figure,
    report_text,
)

CLASSES = ["a", "b", "c"]


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    f1_a = 2 * (3 / 4 * 3 / 4) / (3 / 4 + 3 / 4)
    f1_b = 2 * (2 / 3 * 1) / (2 / 3 + 1)
    f1_c = 2 * (1 * 1 / 2) / (1 + 1 / 2)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b + f1_c) / 3)
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": f1_b, "support": 2}
    )


def test_misaligned_pairs_are_detected_not_scored():
    with pytest.raises(ValueError, match="labels but"):
        classification_metrics(np.array([0, 1, 2]), np.array([0, 1]), CLASSES)


def test_shuffling_predictions_changes_per_class_scores():
    """The reference notebooks' defect: scoring shuffled pairs. Aligned pairs score perfectly."""
    y = np.repeat([0, 1, 2], 5)
    assert classification_metrics(y, y, CLASSES)["macro_f1"] == 1.0
    shuffled = np.random.default_rng(0).permutation(y)
    assert classification_metrics(y, shuffled, CLASSES)["macro_f1"] < 0.8


def test_report_and_figure_name_every_class():
    y = np.array([0, 1, 2, 1])
    assert all(c in report_text(y, y, CLASSES) for c in CLASSES)
    fig = confusion_figure(y, y, CLASSES, "t")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == CLASSES


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # on purpose
def test_confusion_scores_match_sklearn_definitions():
    from sklearn.metrics import confusion_matrix

    from pipeline.evaluate import classification_metrics, scores_from_confusion

    rng = np.random.default_rng(0)
    classes = list("abcde")
    y_true = rng.integers(0, 4, 40)  # class e absent from the test labels
    y_pred = rng.integers(0, 5, 40)
    expected = classification_metrics(y_true, y_pred, classes)
    got = scores_from_confusion(confusion_matrix(y_true, y_pred, labels=range(5)))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert got[key] == pytest.approx(expected[key]), key


def test_bootstrap_intervals_bracket_the_score_and_shrink_with_more_clips():
    from pipeline.evaluate import bootstrap_intervals

    rng = np.random.default_rng(1)
    perfect = np.arange(20) % 4
    assert bootstrap_intervals(perfect, perfect, 4, 200) == {
        k: (1.0, 1.0) for k in ("accuracy", "balanced_accuracy", "macro_f1")
    }

    def noisy(n):
        y = rng.integers(0, 4, n)
        return y, np.where(rng.random(n) < 0.6, y, rng.integers(0, 4, n))

    small, large = (
        bootstrap_intervals(*noisy(20), 4, 500),
        bootstrap_intervals(*noisy(2000), 4, 500),
    )
    for key in small:
        assert small[key][0] <= small[key][1]
        assert large[key][1] - large[key][0] < small[key][1] - small[key][0]
    y, p = noisy(300)
    acc = (y == p).mean()
    low, high = bootstrap_intervals(y, p, 4, 500, seed=3)["accuracy"]
    assert low < acc < high
    assert bootstrap_intervals(y, p, 4, 500, seed=3)["accuracy"] == (low, high)  # seeded


def test_the_gallery_shows_the_most_confident_mistakes_first_with_their_own_frames():
    import pandas as pd

    # clip i's frames are filled with grey level 10 * i: each row must show its own clip
    frames = np.stack([np.full((3, 8, 8, 3), 10 * i, np.uint8) for i in range(5)])
    predictions = pd.DataFrame(
        {
            "path": [f"c{i}.avi" for i in range(5)],
            "actual": ["shot", "shot", "pass", "pass", "shot"],
            "predicted": ["shot", "pass", "shot", "pass", "pass"],
            "confidence": [0.9, 0.6, 0.95, 0.8, 0.7],
        }
    )
    fig = misclassified_figure(frames, predictions, max_clips=2, title="m")
    rows = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in rows] == [
        "c2.avi: pass -> shot (0.95)",
        "c4.avi: shot -> pass (0.70)",
    ]
    assert [int(ax.get_images()[0].get_array()[0, 0, 0]) for ax in rows] == [20, 40]
    assert len(fig.axes) == 2 * 3  # 2 rows of 3 frames: the cap holds
    assert "2 of 3 misclassified" in fig._suptitle.get_text()
    right = predictions.assign(predicted=predictions["actual"])
    empty = misclassified_figure(frames, right, max_clips=2, title="m")
    assert "every test clip is classified right" in empty.axes[0].texts[0].get_text()
