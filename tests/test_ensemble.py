"""The ensemble row's arithmetic: aligning the members' probabilities, pooling them (their
weighted arithmetic or geometric mean), weights equal or fitted on validation, leave-one-out
validation scores, and the errors a bad config gets."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.ensemble import (
    EnsembleConfig,
    aligned_probabilities,
    clip_log_losses,
    ensemble_config,
    fitted_weights,
    leave_one_out_probabilities,
    pooled_probabilities,
    seed_ensembles,
    simplex_grid,
)
from pipeline.errors import PipelineError
from pipeline.probabilities import probability_rows
from pipeline.schema import InvalidConfig, parse_params
from pipeline.schema.sections import Ensemble

CLASSES = ["pass", "shot", "run"]
MODELS = ["frame_cnn", "cnn3d", "cnn_gru"]


def clips(split: str, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"{split}/{i}.avi" for i in range(n)],
            "label": [CLASSES[i % 3] for i in range(n)],
        }
    )


def member_table(probs_by_seed: dict[int, dict[str, np.ndarray]]) -> pd.DataFrame:
    """A model's probabilities.csv content: per seed and split, one row per clip."""
    return pd.concat(
        [
            probability_rows(seed, split, clips(split, len(p)), p, CLASSES)
            for seed, splits in probs_by_seed.items()
            for split, p in splits.items()
        ],
        ignore_index=True,
    )


def one_hot(labels: np.ndarray, confidence: float) -> np.ndarray:
    out = np.full((len(labels), 3), (1 - confidence) / 2)
    out[np.arange(len(labels)), labels] = confidence
    return out


def test_the_grid_covers_the_simplex_with_the_plainest_average_first():
    grid = simplex_grid(3, 0.1)
    assert len(grid) == math.comb(10 + 2, 2)  # 66 ways to split 10 tenths among 3
    assert np.allclose(grid.sum(axis=1), 1) and (grid >= 0).all()
    assert len({tuple(np.round(g, 6)) for g in grid}) == len(grid)
    assert np.allclose(simplex_grid(2, 0.5)[0], [0.5, 0.5])
    assert np.allclose(simplex_grid(4, 0.25)[0], [0.25] * 4)


def test_pooling_is_the_weighted_arithmetic_or_renormalised_geometric_mean():
    """Worked by hand for one clip: members (0.6, 0.3, 0.1) and (0.2, 0.2, 0.6), weights
    0.75 / 0.25. A member sure that a class is wrong vetoes it under geometric pooling."""
    probs = np.array([[[0.6, 0.3, 0.1]], [[0.2, 0.2, 0.6]]])
    weights = np.array([0.75, 0.25])
    assert np.allclose(pooled_probabilities(weights, probs, "arithmetic"), [[0.5, 0.275, 0.225]])
    product = np.array([0.6**0.75 * 0.2**0.25, 0.3**0.75 * 0.2**0.25, 0.1**0.75 * 0.6**0.25])
    geometric = pooled_probabilities(weights, probs, "geometric")
    assert np.allclose(geometric, [product / product.sum()])
    veto = np.array([[[0.5, 0.5, 0.0]], [[0.98, 0.01, 0.01]]])
    assert pooled_probabilities(np.array([0.5, 0.5]), veto, "arithmetic")[0].argmax() == 0
    pooled = pooled_probabilities(np.array([0.5, 0.5]), veto, "geometric")
    assert pooled[0, 2] < 1e-5 and np.allclose(pooled.sum(axis=-1), 1)
    # a grid of weight vectors pools each of them, as fitting does
    grid = simplex_grid(2, 0.25)
    by_vector = pooled_probabilities(grid, probs, "geometric")
    assert by_vector.shape == (len(grid), 1, 3)
    assert np.allclose(by_vector[1], pooled_probabilities(grid[1], probs, "geometric"))


@pytest.mark.parametrize("pooling", ["arithmetic", "geometric"])
def test_fitted_weights_follow_the_model_that_is_right_on_validation(pooling):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    right = one_hot(labels, 0.8)
    noise = rng.dirichlet(np.ones(3), size=30)  # uninformative
    weights = fitted_weights(np.stack([noise, right]), labels, 0.1, pooling)
    assert weights[1] >= 0.8 and weights.sum() == pytest.approx(1)
    # two equally good models keep the plain average (the grid's first point wins ties)
    assert np.allclose(fitted_weights(np.stack([right, right]), labels, 0.1, pooling), [0.5, 0.5])


@pytest.mark.parametrize("pooling", ["arithmetic", "geometric"])
def test_leave_one_out_is_never_better_than_in_sample_per_clip(pooling):
    """Each clip's loss under weights fitted without it is at least its loss under the weights
    fitted with it: the fitted ensemble's validation score is not flattered."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=25)
    probs = rng.dirichlet(np.ones(3), size=(3, 25))
    grid = simplex_grid(3, 0.1)
    weights = fitted_weights(probs, labels, 0.1, pooling)
    in_sample = pooled_probabilities(weights, probs, pooling)
    loo = leave_one_out_probabilities(probs, labels, 0.1, pooling)
    assert np.allclose(loo.sum(axis=1), 1)
    loss = lambda p: -np.log(p[np.arange(25), labels])  # noqa: E731
    assert (loss(loo) >= loss(in_sample) - 1e-12).all()
    pooled = pooled_probabilities(grid, probs, pooling)
    assert clip_log_losses(pooled, labels).shape == (len(grid), 25)


def test_members_are_aligned_by_clip_and_seed_whatever_their_row_order():
    rng = np.random.default_rng(2)
    a = {
        s: {"val": rng.dirichlet(np.ones(3), 4), "test": rng.dirichlet(np.ones(3), 5)}
        for s in (42, 0)
    }
    b = {42: {"val": rng.dirichlet(np.ones(3), 4), "test": rng.dirichlet(np.ones(3), 5)}}
    shuffled = member_table(b).sample(frac=1, random_state=0)
    rows, probs = aligned_probabilities({"cnn3d": member_table(a), "cnn_gru": shuffled}, CLASSES)
    assert set(rows["seed"]) == {42}  # only the seeds both were trained with
    assert probs.shape == (2, 9, 3)
    test = (rows["split"] == "test").to_numpy()
    assert np.allclose(probs[1][test], b[42]["test"].round(6))
    ensembles = seed_ensembles(
        rows, probs, CLASSES, EnsembleConfig(["cnn3d", "cnn_gru"], "equal", 0.1, "arithmetic")
    )
    (only,) = ensembles
    assert only.weights == {"cnn3d": 0.5, "cnn_gru": 0.5}
    expected = (a[42]["test"].round(6) + b[42]["test"].round(6)) / 2
    assert np.allclose(only.test_probs, expected)
    assert list(only.test_clips["path"]) == [f"test/{i}.avi" for i in range(5)]


def test_a_member_without_the_same_clips_or_classes_is_named():
    rng = np.random.default_rng(3)
    full = member_table(
        {42: {"val": rng.dirichlet(np.ones(3), 4), "test": rng.dirichlet(np.ones(3), 5)}}
    )
    with pytest.raises(PipelineError, match="cnn_gru's probabilities.csv does not cover"):
        aligned_probabilities({"cnn3d": full, "cnn_gru": full.iloc[:-1]}, CLASSES)
    with pytest.raises(PipelineError, match="missing classes: \\['run'\\]"):
        aligned_probabilities({"cnn3d": full, "cnn_gru": full.drop(columns="run")}, CLASSES)
    other_seed = full.assign(seed=7)
    with pytest.raises(PipelineError, match="share no training seed"):
        aligned_probabilities({"cnn3d": full, "cnn_gru": other_seed}, CLASSES)


def test_seeds_get_their_own_weights_and_scores():
    labels_val, labels_test = np.arange(12) % 3, np.arange(9) % 3
    good = {"val": one_hot(labels_val, 0.9), "test": one_hot(labels_test, 0.9)}
    bad = {"val": one_hot((labels_val + 1) % 3, 0.9), "test": one_hot((labels_test + 1) % 3, 0.9)}
    tables = {"cnn3d": member_table({1: good, 2: bad}), "cnn_gru": member_table({1: bad, 2: good})}
    rows, probs = aligned_probabilities(tables, CLASSES)
    config = EnsembleConfig(["cnn3d", "cnn_gru"], "fitted", 0.1, "geometric")
    one, two = seed_ensembles(rows, probs, CLASSES, config)
    assert one.weights["cnn3d"] > 0.5 and two.weights["cnn_gru"] > 0.5
    assert one.test_scores["accuracy"] == two.test_scores["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"members": ["cnn3d", "lstm"]}, r"compare.ensemble.members\[1\]='lstm': must be one of"),
        ({"members": ["cnn3d", "cnn3d"]}, "list a model twice"),
        ({"weights": "stacked"}, "compare.ensemble.weights='stacked': must be one of 'equal'"),
        ({"weight_step": 0.3}, "weight_step=0.3 must divide 1 into equal parts"),
        ({"weight_step": 0}, "compare.ensemble.weight_step=0: must be a number > 0"),
        ({"pooling": "median"}, "compare.ensemble.pooling='median': must be one of 'arithmetic'"),
    ],
)
def test_a_bad_ensemble_config_is_refused_naming_the_key(section, message, tiny_params):
    compare = tiny_params["compare"]
    params = {**tiny_params, "compare": {**compare, "ensemble": {**compare["ensemble"], **section}}}
    with pytest.raises(InvalidConfig, match=message):
        parse_params(params)


def test_members_default_to_every_model_and_an_empty_list_means_no_row():
    section = {"weights": "equal", "weight_step": 0.1, "pooling": "arithmetic"}
    assert ensemble_config(Ensemble(members=None, **section)).members == MODELS
    assert ensemble_config(Ensemble(members=[], **section)).members == []


FRAMES = {"num_frames": 4, "size": 32, "pad_value": 0, "sampling": "uniform"}


def frame_model(seed: int):
    """A small Keras model on (4 x 32 x 32 x 3) clips with its own random weights."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4, 32, 32, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv3D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling3D(),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )


def preprocessing(name: str, frames: dict = FRAMES) -> dict:
    return {
        "model": name,
        "classes": CLASSES,
        "input": "frames",
        "frames": frames,
        "model_frames": None,
        "batch_size": 4,
        "min_frames": 4,
    }


@pytest.mark.parametrize("pooling", ["arithmetic", "geometric"])
def test_the_logged_ensemble_serves_its_members_pooled(pooling, tmp_path, monkeypatch):
    """Two members logged as the train stage logs them, packed by log_ensemble_classifier into
    a real MLflow store, loaded back as a pyfunc: a posted clip gets the weighted arithmetic
    (or geometric, renormalised) mean of what each member gives it, and the ensemble refuses
    what a member would refuse."""
    import mlflow
    from conftest import isolated_mlflow_store, write_numbered_video
    from mlflow.exceptions import MlflowException

    from pipeline.serving.ensemble import EnsembleClassifier, log_ensemble_classifier
    from pipeline.serving.pyfunc import load_video_classifier, log_video_classifier

    monkeypatch.setenv("HANDBALL_INFERENCE_RUNTIME", "keras")
    monkeypatch.setenv("HANDBALL_SERVE_PATH_ROOT", str(tmp_path))
    video = tmp_path / "clip.avi"
    write_numbered_video(video, 12)
    weights = {"cnn3d": 0.3, "cnn_gru": 0.7}
    with isolated_mlflow_store(tmp_path / "mlflow.db"):
        # not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to later subprocesses
        experiment = mlflow.MlflowClient().create_experiment("ensemble-test")
        uris = {}
        for seed, name in enumerate(["cnn3d", "cnn_gru"]):
            model_file = tmp_path / f"{name}.keras"
            frame_model(seed).save(model_file)
            with mlflow.start_run(experiment_id=experiment):
                uris[name] = log_video_classifier(model_file, preprocessing(name), name).model_uri
        with mlflow.start_run(experiment_id=experiment):
            info = log_ensemble_classifier(uris, weights, pooling, CLASSES, "ensemble")
        members = {name: load_video_classifier(uri)[0] for name, uri in uris.items()}
        ensemble, pyfunc = load_video_classifier(info.model_uri)

    assert isinstance(ensemble, EnsembleClassifier)
    assert ensemble.pre["members"] == weights and ensemble.classes == CLASSES
    assert ensemble.pre["pooling"] == pooling
    table = pyfunc.predict(pd.DataFrame({"path": [str(video)]}))
    (path, first, error), *_ = members["cnn3d"].classify_clips([video])
    second = next(members["cnn_gru"].classify_clips([video]))[1]
    if pooling == "arithmetic":
        expected = 0.3 * first + 0.7 * second
    else:
        product = first**0.3 * second**0.7
        expected = product / product.sum()
    assert not error and np.allclose(table[CLASSES].to_numpy()[0], expected, atol=1e-6)
    assert table["top_action"][0] == CLASSES[int(expected.argmax())]
    short = tmp_path / "short.avi"
    write_numbered_video(short, 2)
    with pytest.raises(MlflowException, match="row 0: .*2 decodable frames"):
        pyfunc.predict(pd.DataFrame({"path": [str(short)]}))


def test_members_of_different_pipeline_runs_do_not_make_an_ensemble():
    from pipeline.serving.classifier import VideoClassifier
    from pipeline.serving.ensemble import EnsembleClassifier

    model = frame_model(0)
    members = {
        "cnn3d": VideoClassifier(model, preprocessing("cnn3d")),
        "frame_cnn": VideoClassifier(model, preprocessing("frame_cnn", {**FRAMES, "size": 64})),
    }
    with pytest.raises(PipelineError, match="frame_cnn's frames .* differ from cnn3d's"):
        EnsembleClassifier(members, {"cnn3d": 0.5, "frame_cnn": 0.5}, "arithmetic")


def test_mirror_averaging_classifies_each_clip_and_its_mirror_image(tmp_path, monkeypatch):
    """`tta_hflip` (recorded with a frame model, or `predict --hflip`): a clip's probabilities
    are the mean of the model's on the clip and on its left-right mirror image; a model on
    features declines it."""
    from conftest import write_numbered_video

    from pipeline.serving.classifier import VideoClassifier
    from pipeline.serving.clips import clip_frames

    monkeypatch.setenv("HANDBALL_INFERENCE_RUNTIME", "keras")
    model = frame_model(3)
    video = tmp_path / "clip.avi"
    write_numbered_video(video, 12)
    frames, masks = clip_frames(video, preprocessing("cnn3d"))
    frames = frames.copy()
    frames[:, :, :16] = 255  # the left half white: the mirror image differs
    batch = frames[None]
    plain = VideoClassifier(model, preprocessing("cnn3d"))
    averaged = VideoClassifier(model, {**preprocessing("cnn3d"), "tta_hflip": True})
    mirror = np.asarray(model.predict_on_batch(batch[:, :, :, ::-1]))
    expected = (np.asarray(model.predict_on_batch(batch)) + mirror) / 2
    assert np.allclose(averaged.probabilities(batch, masks[None]), expected, atol=1e-6)
    assert not np.allclose(plain.probabilities(batch, masks[None]), expected, atol=1e-6)
    assert plain.use_mirror_averaging() and plain.pre["tta_hflip"]
    features = VideoClassifier(model, {**preprocessing("cnn_gru"), "input": "features"})
    assert not features.use_mirror_averaging()
