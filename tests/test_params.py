"""`params.yaml` is the composed form of `conf/`, and the config holds the reference values."""

import yaml

from pipeline.params import compose_params

from conftest import ROOT


def test_params_yaml_equals_composition_of_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose_params(conf_dir=ROOT / "conf"), (
        "params.yaml is stale: run `python -m pipeline.params`")


def test_model_configs_hold_reference_architectures():
    """The model group files hold DESIGN.md §3; only experiment configs scale them."""
    ref = compose_params(["experiment=uniri_hbd"], conf_dir=ROOT / "conf")
    assert ref["frames"] == {"num_frames": 16, "size": 224, "pad_value": 0, "sampling": "uniform"}
    assert ref["features"]["weights"] == "imagenet"
    fc, c3, gru = (ref["models"][m] for m in ("frame_cnn", "cnn3d", "cnn_gru"))
    assert fc["backbone"] == {"name": "efficientnetb0", "weights": "imagenet", "trainable_layers": 3}
    assert fc["head"] == {"units": [256, 128, 64], "dropout": [0.4, 0.3, 0.5]}
    assert fc["train"]["batch_size"] == 4 and fc["train"]["early_stopping"]["patience"] == 4
    assert c3["num_frames"] == 10 and c3["conv"]["filters"] == [64, 64, 128, 256, 512]
    assert c3["conv"]["padding"] == ["same", "same", "same", "valid", "valid"]
    assert c3["head"]["units"] == [1024, 256, 32] and c3["train"]["learning_rate"] == 1e-4
    assert c3["train"]["early_stopping"] == {"monitor": "val_accuracy", "patience": 15}
    assert gru["gru_units"] == [16, 10] and gru["dense_units"] == [7, 6]
    assert gru["train"]["epochs"] == 150


def test_sample_default_runs_offline():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["dataset"]["source"] == "sample"
    assert params["features"]["weights"] is None
    assert params["models"]["frame_cnn"]["backbone"]["weights"] is None
    assert len(params["dataset"]["classes"]) == 7
