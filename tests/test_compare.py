"""Champion promotion: when `compare` moves the registry alias to a new model version."""

from __future__ import annotations

import pytest

from pipeline.common import PipelineError
from pipeline.compare import promotion_reason


def tags(score: float, dataset: str = "d1", metric: str = "macro_f1") -> dict[str, str]:
    return {"dataset_hash": dataset, "selected_by": metric, metric: f"{score:.4f}",
            "format": "video-pyfunc/1"}


def test_better_moves_only_to_a_higher_score_on_the_same_data():
    assert promotion_reason(tags(0.3), None, "better") == "there is no champion yet"
    assert "beats" in promotion_reason(tags(0.31), tags(0.30), "better")
    assert promotion_reason(tags(0.30), tags(0.30), "better") is None  # a tie keeps the champion
    assert promotion_reason(tags(0.10), tags(0.30), "better") is None


def test_better_follows_new_data_or_a_new_metric():
    assert "other data" in promotion_reason(tags(0.1, dataset="d2"), tags(0.9), "better")
    assert "not chosen by accuracy" in promotion_reason(tags(0.1, metric="accuracy"), tags(0.9),
                                                       "better")


def test_a_champion_of_an_older_model_format_is_replaced():
    old = tags(0.9)
    del old["format"]  # registered before models carried their preprocessing
    assert "keras (no preprocessing)" in promotion_reason(tags(0.1), old, "better")


def test_always_follows_every_run_and_unknown_policies_are_refused():
    assert promotion_reason(tags(0.1), tags(0.9), "always") is not None
    with pytest.raises(PipelineError, match="compare.promote"):
        promotion_reason(tags(0.1), tags(0.9), "sometimes")
