"""`features.runtime` (keras | openvino) and `features.precision` (float32 | bfloat16): the same
seeded ResNet101V2 gives the same features through every runtime, within each precision's
tolerance, and the same again on a second build; what this machine cannot do falls back to
Keras / float32 with a log line. Real OpenVINO (the `openvino` wheel, in the dev extra)."""

from __future__ import annotations

import logging
import sys

import keras
import numpy as np
import pytest

from pipeline.models import runtimes
from pipeline.models.backbones import UnknownLayer, build_feature_backbone, frame_features
from pipeline.models.runtimes import cpu_has_bfloat16
from pipeline.models.seeding import seed_everything

SIZE = 32  # the smallest input ResNet101V2 takes


def features(runtime: str, precision: str, frames: np.ndarray) -> tuple[np.ndarray, tuple]:
    cfg = {"backbone": "resnet101v2", "weights": None, "runtime": runtime, "precision": precision}
    seed_everything(3)
    backbone, preprocess, used = build_feature_backbone(cfg, SIZE)
    return frame_features(backbone, preprocess, frames, batch_size=8, desc=""), used


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 6, SIZE, SIZE, 3), dtype=np.uint8)  # 2 clips x 6 frames


@pytest.fixture(scope="module")
def reference(frames) -> np.ndarray:
    out, used = features("keras", "float32", frames)
    assert used == ("keras", "float32") and out.dtype == np.float32
    return out


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_openvino_float32_gives_the_keras_features_and_repeats_them_exactly(frames, reference):
    pytest.importorskip("openvino")
    first, used = features("openvino", "float32", frames)
    assert used == ("openvino", "float32")
    assert first.shape == reference.shape and first.dtype == np.float32
    assert relative(first, reference) < 1e-4
    again, _ = features("openvino", "float32", frames)  # from the conversion cache
    assert np.array_equal(first, again)


@pytest.mark.slow  # converts ResNet101V2 to OpenVINO's IR twice: ~45 s; CI runs it
def test_a_converted_model_is_kept_and_reused(frames, tmp_path, monkeypatch, caplog):
    """The first OpenVINO build converts and keeps the model (IR with float32 weights, named
    by a digest of the weights); the next loads it without exporting anything and computes
    the same features; a cache that cannot be written is logged, not fatal."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("HANDBALL_OPENVINO_CACHE", str(tmp_path / "cache"))
    first, _ = features("openvino", "float32", frames)
    kept = sorted(p.suffix for p in (tmp_path / "cache").iterdir())
    assert kept == [".bin", ".xml"]  # no partial folder left behind

    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of reading the cache")

    monkeypatch.setattr(keras.Model, "export", no_export)
    again, _ = features("openvino", "float32", frames)
    assert np.array_equal(first, again)
    monkeypatch.undo()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("HANDBALL_OPENVINO_CACHE", str(blocked))
    with caplog.at_level(logging.WARNING, logger="pipeline.models.runtimes"):
        uncached, _ = features("openvino", "float32", frames)
    assert np.array_equal(first, uncached)
    assert "not cached" in caplog.text


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="this CPU has no bfloat16 instructions")
@pytest.mark.parametrize(
    # Keras bfloat16 (~10 s) is the features' fallback, not the default; CI runs it
    "runtime",
    [pytest.param("keras", marks=pytest.mark.slow), "openvino"],
)
def test_bfloat16_features_stay_close_to_float32_and_repeat_exactly(frames, reference, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    first, used = features(runtime, "bfloat16", frames)
    assert used == (runtime, "bfloat16") and first.dtype == np.float32
    difference = relative(first, reference)
    assert 0 < difference < 2e-2  # bfloat16 keeps 8 bits of mantissa: close, not equal
    again, _ = features(runtime, "bfloat16", frames)
    assert np.array_equal(first, again)
    # the mixed policy was only for the backbone: what is built next is float32 again
    assert keras.config.dtype_policy().name == "float32"


def test_without_openvino_or_bfloat16_the_features_fall_back_with_a_log_line(
    frames, reference, monkeypatch, caplog
):
    # OpenVINO absent: an import that fails, as on a machine without the wheel
    monkeypatch.setitem(sys.modules, "openvino", None)
    # A CPU without bfloat16 cannot be had here: the flag check answers no (a stand-in)
    monkeypatch.setattr(runtimes, "cpu_has_bfloat16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.runtimes"):
        out, used = features("openvino", "bfloat16", frames)
    assert used == ("keras", "float32")
    assert np.array_equal(out, reference)
    text = caplog.text
    assert "OpenVINO is not installed" in text and "no bfloat16 instructions" in text


def test_with_a_gpu_the_features_run_on_keras_in_the_precision_asked(monkeypatch, caplog):
    # No GPU can be had here: TensorFlow's device list answers "one GPU" (a stand-in), and the
    # CPU's flag check "no bfloat16", which must not matter when the GPU computes.
    monkeypatch.setattr(runtimes, "tensorflow_sees_gpu", lambda: True)
    monkeypatch.setattr(runtimes, "cpu_has_bfloat16", lambda: False)
    cfg = {"runtime": "openvino", "precision": "bfloat16"}
    with caplog.at_level(logging.WARNING, logger="pipeline.models.runtimes"):
        assert runtimes.feature_runtime(cfg) == ("keras", "bfloat16")
    assert "TensorFlow has a GPU here" in caplog.text
    assert runtimes.feature_runtime({"runtime": "keras", "precision": "float32"}) == (
        "keras",
        "float32",
    )


def test_the_default_is_openvino_bfloat16(tiny_params):
    """The composed config (what `dvc repro` runs) asks for the fast path by default."""
    feats = tiny_params["features"]
    assert (feats["runtime"], feats["precision"]) == ("openvino", "bfloat16")


@pytest.mark.parametrize(
    ("key", "value"), [("runtime", "onnx"), ("precision", "float16")], ids=["runtime", "precision"]
)
def test_an_unknown_runtime_or_precision_names_its_key(key, value):
    cfg = {"backbone": "resnet101v2", "weights": None, key: value}
    with pytest.raises(ValueError, match=f"features.{key}={value!r}"):
        build_feature_backbone(cfg, SIZE)


def test_a_logged_model_records_what_computed_its_features(tiny_params, tmp_path):
    """The features stage writes the runtime and precision it ran with after any fallback
    (`runtime.json`); the preprocessing a cnn_gru is logged with takes them from there, so
    serving computes features as the evaluated ones were, not as the config hoped."""
    import copy
    import json

    from pipeline.schema import parse_params
    from pipeline.stages.train import preprocessing_record

    params = copy.deepcopy(tiny_params)
    params["features"].update(runtime="openvino", precision="bfloat16")
    params["paths"]["features"] = str(tmp_path)
    config = parse_params(params)
    pre = preprocessing_record(config, config.models.cnn_gru, ["a", "b"])["features"]
    assert (pre["runtime"], pre["precision"]) == ("openvino", "bfloat16")
    (tmp_path / "runtime.json").write_text(json.dumps({"runtime": "keras", "precision": "float32"}))
    pre = preprocessing_record(config, config.models.cnn_gru, ["a", "b"])["features"]
    assert (pre["runtime"], pre["precision"]) == ("keras", "float32")
    assert "features" not in preprocessing_record(config, config.models.cnn3d, ["a", "b"])


# ~10 s (ResNet101V2 built twice); the sample's conv2_block3_out feeds cnn_gru in the
# end-to-end tests of make test. CI runs it (make test-all)
@pytest.mark.slow
def test_features_end_at_their_output_layer_averaged_over_space(frames):
    """`features.output_layer` gives the backbone's activations at that layer averaged over
    space (conv3_block4_out: 512 channels of ResNet101V2's first 86 layers), from the same
    seeded weights as the whole backbone's; a name that is not a layer is refused, naming
    the key."""
    cfg = {"backbone": "resnet101v2", "weights": None, "runtime": "keras", "precision": "float32"}
    seed_everything(3)
    whole = keras.applications.ResNet101V2(
        include_top=False, weights=None, input_shape=(SIZE,) * 2 + (3,)
    )
    at_layer = keras.Model(whole.input, whole.get_layer("conv3_block4_out").output)
    seed_everything(3)
    backbone, preprocess, _ = build_feature_backbone(
        {**cfg, "output_layer": "conv3_block4_out"}, SIZE
    )
    assert backbone.output_shape == (None, 512) and len(backbone.layers) == 87  # + input, pooling
    got = frame_features(backbone, preprocess, frames, batch_size=8, desc="")
    flat = preprocess(frames.reshape((-1,) + frames.shape[2:]).astype(np.float32))
    expected = np.asarray(at_layer.predict(flat, verbose=0)).mean(axis=(1, 2))
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnknownLayer, match=r"features\.output_layer=conv9_out.*conv3_block4_out"):
        build_feature_backbone({**cfg, "output_layer": "conv9_out"}, SIZE)
