"""Champion promotion: when `compare` moves the registry alias to a new model version."""

from __future__ import annotations

import pytest

from pipeline.common import PipelineError
from pipeline.serving.registry import promotion_reason


def tags(
    score: float, dataset: str = "d1", metric: str = "val_macro_f1", split: str = "s1"
) -> dict[str, str]:
    return {
        "dataset_hash": dataset,
        "split_hash": split,
        "selected_by": metric,
        metric: f"{score:.4f}",
        "format": "video-pyfunc/1",
    }


def test_better_moves_only_to_a_higher_score_on_the_same_data():
    assert promotion_reason(tags(0.3), None, "better") == "there is no champion yet"
    assert "beats" in promotion_reason(tags(0.31), tags(0.30), "better")
    assert promotion_reason(tags(0.30), tags(0.30), "better") is None  # a tie keeps the champion
    assert promotion_reason(tags(0.10), tags(0.30), "better") is None


def test_better_follows_new_data_a_new_split_or_a_new_metric():
    assert "other data" in promotion_reason(tags(0.1, dataset="d2"), tags(0.9), "better")
    assert "another split" in promotion_reason(tags(0.1, split="s2"), tags(0.9), "better")
    assert "not chosen by val_accuracy" in promotion_reason(
        tags(0.1, metric="val_accuracy"), tags(0.9), "better"
    )


def test_a_champion_chosen_on_test_scores_is_replaced():
    """Champions registered before selection moved to validation were chosen by test macro-F1
    (and carry no split hash): a validation-chosen model replaces them whatever its score."""
    old = {
        "dataset_hash": "d1",
        "selected_by": "macro_f1",
        "macro_f1": "0.9900",
        "format": "video-pyfunc/1",
    }
    assert promotion_reason(tags(0.1), old, "better") is not None


def test_a_champion_of_an_older_model_format_is_replaced():
    old = tags(0.9)
    del old["format"]  # registered before models carried their preprocessing
    assert "keras (no preprocessing)" in promotion_reason(tags(0.1), old, "better")


def test_always_follows_every_run_and_unknown_policies_are_refused():
    assert promotion_reason(tags(0.1), tags(0.9), "always") is not None
    with pytest.raises(PipelineError, match="compare.promote"):
        promotion_reason(tags(0.1), tags(0.9), "sometimes")
