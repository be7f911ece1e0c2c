"""`train.networks`: the one model that averages several networks (its members). Trained
networks are tested in `tests/test_learning.py` (cnn3d); here each of the three builders,
untrained but compiled as training leaves it (cnn_gru's feature normalisation adapted), at a
small size."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def footage_config():
    from conftest import ROOT

    from pipeline.params import compose_params
    from pipeline.schema import parse_params

    params = compose_params(["dataset=folder", "dataset.path=clips"], conf_dir=ROOT / "conf")
    return parse_params(params)


def model_inputs(name: str, rng: np.random.Generator):
    """Two clips as `name` reads them: frames and flow (B,T,S,S,5) or features and mask."""
    if name == "cnn_gru":
        features = rng.normal(size=(2, 6, 64)).astype(np.float32)
        return {"features": features, "mask": np.array([[True] * 6, [True] * 4 + [False] * 2])}
    return rng.integers(0, 256, size=(2, 8, 80, 80, 5)).astype(np.float32)


def compiled_copy(model_cfg, x, seed: int):
    """One member as `fit_member` leaves it: built from `seed`, normalisation adapted, compiled
    with the configured optimiser (the pipeline's own learning-rate schedule)."""
    import keras

    from pipeline.models.fitting import build_model, make_optimizer

    keras.utils.set_random_seed(seed)
    model = build_model(model_cfg, x, 7)
    if isinstance(x, dict):
        model.get_layer("feature_norm").adapt(x["features"][x["mask"]][None])
    model.compile(optimizer=make_optimizer(model_cfg.train, 4), loss="categorical_crossentropy")
    return model


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("frame_cnn", marks=pytest.mark.slow),  # EfficientNetB0 four times, ~20 s
        # ~14 s; the averaging does not depend on the model: cnn_gru (dict inputs, an adapted
        # normalisation) is the case make test keeps. CI runs both (make test-all)
        pytest.param("cnn3d", marks=pytest.mark.slow),
        "cnn_gru",
    ],
)
def test_averaged_model_predicts_the_mean_of_its_members_here_and_after_loading(
    name, footage_config, tmp_path
):
    """The averaged model answers the mean of its members' probabilities, in this process and
    in a fresh one with Keras alone (as serving loads a model): the members inside it are
    saved without their compilation, and with their state (an adapted normalisation)."""
    import keras
    from conftest import saved_model_in_a_fresh_process

    from pipeline.models.members import averaged_model

    keras.backend.clear_session()
    model_cfg = getattr(footage_config.models, name)
    x = model_inputs(name, np.random.default_rng(0))
    members = [compiled_copy(model_cfg, x, seed) for seed in (0, 1)]
    expected = np.mean([m.predict(x, verbose=0) for m in members], axis=0)
    assert not np.array_equal(*[m.predict(x, verbose=0) for m in members])  # two networks

    model = averaged_model(members, name)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    loaded, _ = saved_model_in_a_fresh_process(model, x, tmp_path)
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-6)


def test_member_seeds_start_with_the_run_seed_and_differ_from_the_other_runs():
    from pipeline.models.members import member_seeds

    assert member_seeds(42, 1) == [42]
    runs = {seed: member_seeds(seed, 3) for seed in (0, 1, 2)}
    assert [seeds[0] for seeds in runs.values()] == [0, 1, 2]
    every = [s for seeds in runs.values() for s in seeds]
    assert len(set(every)) == len(every) == 9
    assert member_seeds(0, 3) == runs[0]  # the same every time
