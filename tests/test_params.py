"""`params.yaml` is the composed form of `conf/`, and the config holds the reference values."""

import pytest
import yaml
from conftest import ROOT, documentation_text

from pipeline.params import compose_params
from pipeline.schema import InvalidConfig, validate_params


def test_params_yaml_equals_composition_of_conf():
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == compose_params(conf_dir=ROOT / "conf"), (
        "params.yaml is stale: run `python -m pipeline.params`"
    )


def test_reference_settings_are_one_override_away():
    """`recipe=reference` with the reference sizes gives DESIGN.md §3's architectures and
    training; the default recipe keeps the architectures and changes only training settings
    and inputs (documented in conf/model/*.yaml and conf/inputs/)."""
    ref = compose_params(
        ["experiment=uniri_hbd", "dataset=uniri_hbd", "recipe=reference"], conf_dir=ROOT / "conf"
    )
    flow = ref["frames"].pop("flow")
    assert ref["frames"] == {"num_frames": 16, "size": 224, "pad_value": 0, "sampling": "uniform"}
    assert flow["enabled"] is False  # the reference reads no optical flow
    assert ref["features"]["weights"] == "imagenet"
    fc, c3, gru = (ref["models"][m] for m in ("frame_cnn", "cnn3d", "cnn_gru"))
    assert fc["backbone"] == {
        "name": "efficientnetb0",
        "weights": "imagenet",
        "trainable_layers": 3,
        "batchnorm_momentum": None,
        "zero_init_residual": False,
        "input_size": None,  # the frames at their cached size
        "output_layer": None,  # the whole EfficientNetB0
    }
    assert fc["motion"] == c3["motion"] == "rgb" and ref["features"]["motion"] is False
    assert fc["temporal_pooling"] == c3["temporal_pooling"] == "mean"
    assert fc["head"] == {"units": [256, 128, 64], "dropout": [0.4, 0.3, 0.5]}
    assert fc["train"]["batch_size"] == 4 and fc["train"]["early_stopping"]["patience"] == 4
    assert fc["train"]["optimizer"] == c3["train"]["optimizer"] == "adam"
    assert fc["train"]["lr_decay"] is None and fc["train"]["epochs"] == 20
    assert c3["num_frames"] == 10 and c3["conv"]["filters"] == [64, 64, 128, 256, 512]
    assert c3["conv"]["padding"] == ["same", "same", "same", "valid", "valid"]
    assert c3["head"]["units"] == [1024, 256, 32] and c3["train"]["learning_rate"] == 1e-4
    assert c3["train"]["early_stopping"] == {"monitor": "val_accuracy", "patience": 15}
    assert gru["gru_units"] == [16, 10] and gru["dense_units"] == [7, 6]
    assert c3["train"]["lr_decay"] == {"decay_steps": 1000, "decay_rate": 0.96}
    assert c3["train"]["batch_size"] == 4 and c3["train"]["epochs"] == 100
    assert gru["train"]["epochs"] == 150
    # the default recipe: same architectures, the whole EfficientNet trained from scratch
    default = compose_params(["experiment=uniri_hbd", "dataset=uniri_hbd"], conf_dir=ROOT / "conf")
    for name in ("frame_cnn", "cnn3d"):
        assert default["models"][name]["head"] == ref["models"][name]["head"]
    assert default["models"]["cnn3d"]["conv"] == c3["conv"]
    # ImageNet weights: fine-tune the top only, as the reference did
    assert default["models"]["frame_cnn"]["backbone"]["trainable_layers"] == 3
    offline = compose_params(["dataset=folder"], conf_dir=ROOT / "conf")
    assert offline["models"]["frame_cnn"]["backbone"]["trainable_layers"] == "all"


def test_sample_default_runs_offline():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["dataset"]["source"] == "sample"
    assert params["features"]["weights"] is None
    assert params["models"]["frame_cnn"]["backbone"]["weights"] is None
    assert len(params["dataset"]["classes"]) == 7


def test_the_sample_sets_how_long_models_train_and_other_datasets_do_not():
    models = yaml.safe_load((ROOT / "conf" / "dataset" / "sample.yaml").read_text())["models"]
    sample = compose_params([], conf_dir=ROOT / "conf")
    folder = compose_params(["dataset=folder"], conf_dir=ROOT / "conf")
    for name in ("frame_cnn", "cnn3d", "cnn_gru"):
        model_default = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
        epochs = models[name]["train"]["epochs"]
        # no more than on real footage (frame_cnn: as many, on half the frames)
        assert epochs <= model_default["train"]["epochs"]
        # the dataset comes after the models in the defaults list, so its value wins
        assert sample["models"][name]["train"]["epochs"] == epochs
        assert folder["models"][name]["train"]["epochs"] == model_default["train"]["epochs"]
    # a recipe or experiment chosen on top still wins over the dataset
    tiny = compose_params(["experiment=tiny"], conf_dir=ROOT / "conf")
    assert tiny["models"]["frame_cnn"]["train"]["epochs"] == 2
    reference = compose_params(["recipe=reference"], conf_dir=ROOT / "conf")
    assert reference["models"]["frame_cnn"]["train"]["epochs"] == 20


def test_real_footage_averages_three_networks_of_each_model_trained_from_random_init():
    """`train.networks` (conf/model/*.yaml, docs/models.md): real footage averages three
    networks of frame_cnn and cnn3d; the sample (make repro's time), the reference recipe and
    frame_cnn on an ImageNet backbone (`experiment=uniri_hbd`) train one."""

    def networks(overrides: list[str]) -> dict[str, int]:
        params = compose_params(overrides, conf_dir=ROOT / "conf")
        return {name: model["train"]["networks"] for name, model in params["models"].items()}

    assert networks(["dataset=folder"]) == {"frame_cnn": 3, "cnn3d": 3, "cnn_gru": 1}
    for one_each in ([], ["recipe=reference"], ["dataset=folder", "recipe=reference"]):
        assert set(networks(one_each).values()) == {1}, one_each
    pretrained = networks(["dataset=folder", "experiment=uniri_hbd"])
    assert pretrained == {"frame_cnn": 1, "cnn3d": 3, "cnn_gru": 1}


def frame_reads(params: dict) -> tuple:
    """(frames cached per clip, {model: frames read}, cnn3d's temporal jitter and views)."""
    models = params["models"]
    reads = {name: model["num_frames"] for name, model in models.items()}
    cnn3d = models["cnn3d"]
    return (
        params["frames"]["num_frames"],
        reads,
        (cnn3d["train"]["temporal_jitter"], cnn3d["tta_views"]),
    )


def test_every_dataset_caches_8_frames_all_read_and_clips_jitter_is_the_16_frame_recipe(
    tmp_path,
):
    """conf/clips/: every dataset (one a user adds too) caches 8 frames a clip, all read;
    `clips=jitter` caches 16, each model reads 8 and cnn3d draws them afresh each epoch and
    averages its views (docs/scores.md: not the default); the sample's
    frame_cnn reads 4, the tests' tiny experiment 6 cached; `experiment=uniri_hbd` the
    reference's 16, each model reading what conf/model/ says."""
    import shutil

    jitter = (16, {"frame_cnn": 8, "cnn3d": 8, "cnn_gru": 8}, (True, True))
    eight_all_read = (8, {"frame_cnn": None, "cnn3d": None, "cnn_gru": None}, (False, False))
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    own = yaml.safe_load((conf / "dataset" / "folder.yaml").read_text()) | {"name": "own"}
    (conf / "dataset" / "own.yaml").write_text(yaml.safe_dump(own))
    for dataset in ("folder", "uniri_hbd", "own"):
        assert frame_reads(compose_params([f"dataset={dataset}"], conf_dir=conf)) == (
            eight_all_read
        )
        params = compose_params([f"dataset={dataset}", "clips=jitter"], conf_dir=conf)
        validate_params(params)  # 16 cached >= 2 x 8 read: the schema's condition for both
        assert frame_reads(params) == jitter, dataset
    sample = compose_params([], conf_dir=conf)
    assert frame_reads(sample) == (
        8,
        {"frame_cnn": 4, "cnn3d": None, "cnn_gru": None},
        (False, False),
    )
    tiny_folder = compose_params(["dataset=folder", "experiment=tiny"], conf_dir=conf)
    assert frame_reads(tiny_folder) == (
        6,
        {"frame_cnn": 3, "cnn3d": None, "cnn_gru": None},
        (False, False),
    )
    reference = compose_params(["dataset=folder", "experiment=uniri_hbd"], conf_dir=conf)
    assert frame_reads(reference) == (
        16,
        {"frame_cnn": None, "cnn3d": 10, "cnn_gru": None},
        (False, False),
    )


def readme_exp_run_overrides() -> list[list[str]]:
    """The `-S` overrides of every `dvc exp run` command in the documentation's bash blocks."""
    import re
    import shlex

    text = documentation_text()
    script = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    script = re.sub(r"\$\([^)]*\)", "0" * 64, script).replace("$HOME", "/home/user")
    commands = []
    for line in script.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens[1:3] == ["exp", "run"] and tokens[0].endswith("dvc"):
            commands.append([tokens[i + 1] for i, t in enumerate(tokens) if t == "-S"])
    return commands


def test_readme_dvc_exp_run_commands_compose():
    """Each README `dvc exp run -S ...` (every point of a queued grid) names real config keys
    and values: Hydra composes it as DVC would, so copy-pasted commands do not fail on a typo."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    commands = readme_exp_run_overrides()
    assert len(commands) >= 6 and any("," in o for c in commands for o in c)
    parser = OverridesParser.create()
    for overrides in commands:
        choices = [
            [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line]
            for o in parser.parse_overrides(overrides)
        ]
        for point in itertools.product(*choices):
            params = compose_params(list(point), conf_dir=ROOT / "conf")
            assert params["models"].keys() == {"frame_cnn", "cnn3d", "cnn_gru"}, point
            if "models.cnn3d.train.epochs=-5" in point:  # the README's example of a refusal
                with pytest.raises(InvalidConfig, match="epochs=-5: must be a whole number"):
                    validate_params(params)
            else:  # every other printed command passes the config schema too
                validate_params(params)
