"""Champion promotion: when `compare` moves the registry alias to a new model version."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
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


def test_a_champion_per_dataset_and_no_dataset_takes_anothers(
    tmp_path, monkeypatch, caplog, tiny_params
):
    """In a real MLflow store: `{dataset}` in `compare.register_as` gives each dataset its own
    registered model and champion; a registered model holding one dataset's models refuses a
    model of another (with `promote: always` too), also in a store from before the
    registered model's dataset tag, where its champion's tag says which data it holds."""
    import mlflow
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import MlflowClient

    from pipeline.schema.sections import Compare
    from pipeline.serving.registry import register_champion

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # as conftest.isolated_mlflow_store: MLFLOW_TRACKING_URI must not outlive the test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", uri)
    client = MlflowClient()

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    def trained(dataset: str, score: float):
        """A logged model of `dataset`, the comparison row that ranks it, the clean stage's
        record of its data."""
        with mlflow.start_run(tags={"git_commit": "0" * 40}) as run:
            # no requirement inference (a subprocess per model, ~4 s): nothing here installs it
            info = mlflow.pyfunc.log_model(
                name="model", python_model=Constant(), pip_requirements=[]
            )
        best = {"model": "cnn3d", "val_macro_f1": score, "macro_f1": score}
        best.update(macro_f1_low=score - 0.1, macro_f1_high=score + 0.1)
        ref = {"run_id": run.info.run_id, "model_uri": info.model_uri}
        data = {"name": dataset, "dataset_hash": f"hash-{dataset}", "split_hash": "s"}
        return best, ref, data

    def params(register_as: str, promote: str = "better") -> Compare:
        changes = {"register_as": register_as, "alias": "champion", "promote": promote}
        return Compare.model_validate({**tiny_params["compare"], **changes})

    per_dataset = params("actions-{dataset}", promote="always")
    real = register_champion(per_dataset, *trained("uniri_hbd", 0.6))
    sample = register_champion(per_dataset, *trained("sample", 0.9))
    assert (real.name, sample.name) == ("actions-uniri_hbd", "actions-sample")
    assert client.get_registered_model("actions-uniri_hbd").tags["dataset_name"] == "uniri_hbd"
    assert str(client.get_model_version_by_alias("actions-uniri_hbd", "champion").version) == "1"

    # one name for every dataset: the sample is refused, whatever the promotion policy
    shared = params("team-model", promote="always")
    first = register_champion(shared, *trained("uniri_hbd", 0.6))
    assert register_champion(shared, *trained("sample", 0.9)) is None
    assert "team-model holds models of uniri_hbd, and a model trained on sample" in caplog.text
    assert len(client.search_model_versions("name = 'team-model'")) == 1
    assert client.get_model_version_by_alias("team-model", "champion").version == first.version

    # a store from before the tag: the champion's dataset decides
    client.delete_registered_model_tag("team-model", "dataset_name")
    assert register_champion(shared, *trained("sample", 0.9)) is None
    newer = register_champion(shared, *trained("uniri_hbd", 0.7))
    assert str(newer.version) == "2" and client.get_registered_model("team-model").tags
