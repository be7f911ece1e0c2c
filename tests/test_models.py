"""The three model builders produce the documented shapes; bad configs fail clearly."""

import numpy as np
import pytest
from conftest import model_section

from pipeline.models import builders
from pipeline.models.backbones import UnknownLayer, WeightsUnavailable, build_backbone


# The builders take the schema's typed sections; these tests write them as mappings, as in conf/.
def build_frame_cnn(cfg: dict, *args, **kwargs):
    return builders.build_frame_cnn(model_section("frame_cnn", cfg), *args, **kwargs)


def build_cnn3d(cfg: dict, *args, **kwargs):
    return builders.build_cnn3d(model_section("cnn3d", cfg), *args, **kwargs)


def build_cnn_gru(cfg: dict, *args, **kwargs):
    return builders.build_cnn_gru(model_section("cnn_gru", cfg), *args, **kwargs)


def test_frame_cnn_shapes_and_frozen_backbone(tiny_params):
    cfg = {**tiny_params["models"]["frame_cnn"], "motion": "rgb"}  # the sample's reads flow
    model = build_frame_cnn(cfg, num_frames=3, size=32, num_classes=7)
    assert model.input_shape == (None, 3, 32, 32, 3)
    assert model.output_shape == (None, 7)
    backbone = model.get_layer("efficientnetb0")
    trainable = [layer for layer in backbone.layers if layer.trainable]
    expected = cfg["backbone"]["trainable_layers"]
    assert len(trainable) == (len(backbone.layers) if expected == "all" else expected)
    probs = model.predict(np.zeros((2, 3, 32, 32, 3), np.float32), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_zero_init_residual_starts_every_residual_block_as_the_identity(tiny_params):
    cfg = {**tiny_params["models"]["frame_cnn"], "motion": "rgb"}
    bb = {**cfg["backbone"], "weights": None, "zero_init_residual": True, "output_layer": None}
    cfg = {**cfg, "backbone": bb}  # the whole EfficientNetB0 (the tiny config stops at block 5)
    backbone = build_frame_cnn(cfg, num_frames=3, size=32, num_classes=7).get_layer(
        "efficientnetb0"
    )
    gammas = {
        layer.name: np.asarray(layer.gamma)
        for layer in backbone.layers
        if layer.name.endswith("_project_bn")
    }
    residual = {n.removesuffix("_add") + "_project_bn" for n in (x.name for x in backbone.layers)}
    residual &= set(gammas)
    assert len(residual) == 9  # EfficientNetB0: 2b 3b 4b 4c 5b 5c 6b 6c 6d
    assert all(not gammas[n].any() for n in residual)
    # the first block of each stage has no shortcut: its branch is all there is, kept as drawn
    assert all(gammas[n].all() for n in set(gammas) - residual)
    # so each residual block passes its input through unchanged, e.g. block 6b
    import keras

    probe = keras.Model(
        backbone.input,
        [backbone.get_layer("block6a_project_bn").output, backbone.get_layer("block6b_add").output],
    )
    frames = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    block_in, block_out = probe.predict(frames, verbose=0)
    assert np.abs(block_in).max() > 0
    np.testing.assert_array_equal(block_out, block_in)
    pretrained = {**cfg, "backbone": {**cfg["backbone"], "weights": "imagenet"}}
    with pytest.raises(ValueError, match="zero_init_residual"):  # raised before any download
        build_frame_cnn(pretrained, num_frames=3, size=32, num_classes=7)


def test_cnn3d_reference_architecture_shapes(tiny_params):
    cfg = dict(tiny_params["models"]["cnn3d"])
    cfg["conv"] = {**cfg["conv"], "filters": [64, 64, 128, 256, 512]}
    model = build_cnn3d(cfg, num_frames=10, size=224, num_classes=7)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv3D"]
    assert [c.filters for c in convs] == [64, 64, 128, 256, 512]
    assert convs[-1].output.shape[1:] == (6, 11, 11, 512)  # valid convs shrink time and space
    assert model.output_shape == (None, 7)


def test_cnn3d_too_small_input_names_the_config(tiny_params):
    with pytest.raises(ValueError, match="frames.size"):
        build_cnn3d(tiny_params["models"]["cnn3d"], num_frames=6, size=64, num_classes=7)


def test_cnn_gru_masks_repeated_frames(tiny_params):
    cfg = tiny_params["models"]["cnn_gru"]
    model = build_cnn_gru(cfg, num_frames=4, feature_dim=16, num_classes=5)
    assert model.output_shape == (None, 5)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(1, 4, 16)).astype(np.float32)
    mask = np.array([[True, True, False, False]])
    changed = feats.copy()
    changed[0, 2:] = 99.0  # masked steps must not change the prediction
    a = model.predict({"features": feats, "mask": mask}, verbose=0)
    b = model.predict({"features": changed, "mask": mask}, verbose=0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_random_init_backbone_is_reproducible_by_seed():
    """`weights: null` features must not change between two runs of the same config."""
    from pipeline.models.seeding import seed_everything

    builds = []
    for _ in range(2):
        seed_everything(5)
        builds.append(build_backbone("efficientnetb0", None, (32, 32, 3), "features.weights"))
    for a, b in zip(builds[0].get_weights(), builds[1].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_missing_weights_file_names_the_config_key(tmp_path):
    with pytest.raises(WeightsUnavailable, match=r"features\.weights=.*no such weights file"):
        build_backbone("resnet101v2", str(tmp_path / "nope.h5"), (64, 64, 3), "features.weights")


def test_local_weights_file_is_loaded(tmp_path):
    first = build_backbone("efficientnetb0", None, (32, 32, 3), "models.frame_cnn.backbone.weights")
    path = tmp_path / "effnet.weights.h5"
    first.save_weights(path)
    second = build_backbone(
        "efficientnetb0", str(path), (32, 32, 3), "models.frame_cnn.backbone.weights"
    )
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_imagenet_download_failure_names_the_config_key(tmp_path, monkeypatch):
    """Real download attempt into an empty Keras cache; this machine has no internet."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    try:
        build_backbone(
            "efficientnetb0", "imagenet", (32, 32, 3), "models.frame_cnn.backbone.weights"
        )
    except WeightsUnavailable as exc:
        message = str(exc)
        assert "models.frame_cnn.backbone.weights=imagenet" in message
        assert "=null" in message
    else:
        pytest.skip("ImageNet weights were downloadable here; the offline error path is untested")


def test_frame_cnn_backbone_sees_frames_at_its_input_size_and_saves(tiny_params, tmp_path):
    """`backbone.input_size` resizes each frame inside the model: the model still takes the
    cached frame size, the backbone sees the smaller one (a quarter of its activations at
    half the side), and a saved model gives the same probabilities."""
    import keras

    bb = {**tiny_params["models"]["frame_cnn"]["backbone"], "weights": None, "input_size": 40}
    cfg = {**tiny_params["models"]["frame_cnn"], "motion": "flow", "backbone": bb}
    model = build_frame_cnn(cfg, num_frames=3, size=80, num_classes=5)
    assert model.input_shape == (None, 3, 80, 80, 5)  # RGB and flow, as cached
    assert model.get_layer("efficientnetb0").input_shape == (None, 40, 40, 2)
    clips = np.random.default_rng(1).integers(0, 256, (2, 3, 80, 80, 5)).astype(np.float32)
    model.save(tmp_path / "frame_cnn.keras")
    loaded = keras.models.load_model(tmp_path / "frame_cnn.keras")
    np.testing.assert_allclose(
        model.predict(clips, verbose=0), loaded.predict(clips, verbose=0), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="input_size"):
        model_section("frame_cnn", {**cfg, "backbone": {**bb, "input_size": 16}})


# ~7 s; the sample's block5c_add is built, trained, saved and served by the end-to-end
# tests of make test. CI runs it (make test-all)
@pytest.mark.slow
def test_frame_cnn_backbone_ends_at_its_output_layer_and_saves(tiny_params, tmp_path):
    """`backbone.output_layer` keeps EfficientNetB0 up to that layer (block4c_add: its first
    four stages, 80 channels at 1/16 of the side); the saved model gives the same
    probabilities, and a name that is not one of its layers is refused, naming the key."""
    import keras

    bb = {**tiny_params["models"]["frame_cnn"]["backbone"], "weights": None, "input_size": None}
    bb["output_layer"] = None  # the tests' tiny config (as the sample) sets block5c_add
    cfg = {**tiny_params["models"]["frame_cnn"], "motion": "flow", "backbone": bb}
    whole = build_frame_cnn(cfg, num_frames=2, size=64, num_classes=4)
    cfg["backbone"] = {**bb, "output_layer": "block4c_add"}
    model = build_frame_cnn(cfg, num_frames=2, size=64, num_classes=4)
    backbone = model.get_layer("efficientnetb0")
    assert backbone.output_shape == (None, 4, 4, 80)
    assert whole.get_layer("efficientnetb0").output_shape == (None, 2, 2, 1280)
    assert len(backbone.layers) == 119 and len(whole.get_layer("efficientnetb0").layers) == 237
    clips = np.random.default_rng(2).integers(0, 256, (2, 2, 64, 64, 5)).astype(np.float32)
    model.save(tmp_path / "frame_cnn.keras")
    loaded = keras.models.load_model(tmp_path / "frame_cnn.keras")
    np.testing.assert_allclose(
        model.predict(clips, verbose=0), loaded.predict(clips, verbose=0), rtol=1e-5, atol=1e-6
    )
    cfg["backbone"] = {**bb, "output_layer": "block9z_add"}
    with pytest.raises(UnknownLayer, match=r"output_layer=block9z_add.*block5c_add"):
        build_frame_cnn(cfg, num_frames=2, size=64, num_classes=4)


def test_input_and_pooling_options_build_save_and_load(tiny_params, tmp_path):
    """The options in conf/ (motion inputs, temporal pooling, in-model clip augmentation,
    feature motion) build, keep their documented shapes, and survive save/load with the same
    predictions (served models are the saved files)."""
    import keras

    frames = np.random.default_rng(0).integers(0, 256, (2, 6, 80, 80, 3)).astype(np.float32)
    cfg = {
        **tiny_params["models"]["cnn3d"],
        "motion": "rgb_diff",
        "temporal_pooling": "mean_max",
        "clip_augment": {
            "flip": True,
            "hue": 0.5,
            "saturation": 0.5,
            "brightness": 0.2,
            "contrast": 0.2,
        },
    }
    model = build_cnn3d(cfg, num_frames=6, size=80, num_classes=4)
    path = tmp_path / "cnn3d.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(
        model.predict(frames, verbose=0), loaded.predict(frames, verbose=0), rtol=1e-5, atol=1e-6
    )  # augmentation is off at inference
    fc = {
        **tiny_params["models"]["frame_cnn"],
        "motion": "rgb_diff",
        "temporal_pooling": "temporal_conv",
        "backbone": {**tiny_params["models"]["frame_cnn"]["backbone"], "weights": None},
    }
    assert build_frame_cnn(fc, num_frames=3, size=32, num_classes=4).output_shape == (None, 4)
    with pytest.raises(ValueError, match="more or fewer than 3 channels"):
        build_frame_cnn(
            {**fc, "backbone": {**fc["backbone"], "weights": "imagenet"}},
            num_frames=3,
            size=32,
            num_classes=4,
        )
    with pytest.raises(ValueError, match="temporal_pooling"):
        build_frame_cnn(
            {**fc, "temporal_pooling": "attention"}, num_frames=3, size=32, num_classes=4
        )
    gru = {**tiny_params["models"]["cnn_gru"], "feature_motion": "concat", "input_dropout": 0.1}
    model = build_cnn_gru(gru, num_frames=4, feature_dim=16, num_classes=5)
    assert model.output_shape == (None, 5)
    with pytest.raises(ValueError, match="feature_motion"):
        build_cnn_gru(
            {**gru, "feature_motion": "both"}, num_frames=4, feature_dim=16, num_classes=5
        )


def test_cnn3d_group_norm_takes_its_statistics_from_each_clip(tiny_params):
    """`conv.norm: group` puts GroupNormalization where the reference has BatchNormalization:
    in training, a clip's activations no longer depend on the other clips of its batch."""
    import keras

    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (3, 6, 80, 80, 3)).astype(np.float32)
    for norm, independent in (("group", True), ("batch", False)):
        cfg = {**tiny_params["models"]["cnn3d"], "motion": "rgb"}
        cfg["conv"] = {**cfg["conv"], "norm": norm, "groups": 2}
        model = build_cnn3d(cfg, num_frames=6, size=80, num_classes=4)
        kind = (
            keras.layers.GroupNormalization if norm == "group" else keras.layers.BatchNormalization
        )
        norms = [layer for layer in model.layers if isinstance(layer, kind)]
        assert len(norms) == len(cfg["conv"]["filters"])
        last = keras.Model(model.inputs, norms[-1].output)
        with_second = last(clips[[0, 1]], training=True)[0]
        with_third = last(clips[[0, 2]], training=True)[0]
        assert np.allclose(with_second, with_third, atol=1e-5) == independent, norm


def test_label_smoothing_is_crossentropy_against_smoothed_targets():
    """Per clip: -sum(target * log p) with the true class's target 1 - s + s/K and every
    other class's s/K; without smoothing, Keras' own sparse crossentropy."""
    import keras

    from pipeline.models.losses import per_clip_loss, training_loss

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    labels = np.array([0, 2])
    smoothed = keras.ops.convert_to_numpy(per_clip_loss(0.3)(labels, probs))
    targets = np.full((2, 3), 0.1)
    targets[[0, 1], labels] = 0.8
    np.testing.assert_allclose(smoothed, -(targets * np.log(probs)).sum(axis=1), rtol=1e-5)
    column = keras.ops.convert_to_numpy(per_clip_loss(0.3)(labels[:, None], probs))
    np.testing.assert_allclose(column, smoothed, rtol=1e-6)  # labels as a column, as Keras feeds
    plain = keras.ops.convert_to_numpy(per_clip_loss(0.0)(labels, probs))
    np.testing.assert_allclose(plain, -np.log(probs[[0, 1], labels]), rtol=1e-5)
    assert training_loss(0.0) == "sparse_categorical_crossentropy"
    assert training_loss(0.3).get_config()["label_smoothing"] == 0.3


def test_mixup_targets_are_read_by_the_loss_and_the_accuracy():
    """With mixup a training batch's targets are distributions over the classes: the loss is
    -sum(target * log p) (smoothed as configured), validation's class indices still work, and
    the accuracy compares the most probable class with the target's largest part."""
    import keras

    from pipeline.models.losses import training_accuracy, training_loss

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)
    targets = np.array([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3]], np.float32)
    loss = training_loss(0.0, mixup=True)
    expected = -(targets * np.log(probs)).sum(axis=1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loss.call(targets, probs)), expected, rtol=1e-5
    )
    indices = np.array([0, 2])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loss.call(indices[:, None], probs)),
        -np.log(probs[[0, 1], indices]),
        rtol=1e-5,
    )
    accuracy = training_accuracy(mixup=True)
    accuracy.update_state(targets, probs)  # clip 0 right (class 0), clip 1 wrong (1 vs 2)
    assert float(accuracy.result()) == pytest.approx(0.5)
    accuracy.update_state(indices, probs)  # both right
    assert float(accuracy.result()) == pytest.approx(0.75)
    assert accuracy.name == "accuracy" and training_accuracy(mixup=False) == "accuracy"
