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


def readme_exp_run_overrides() -> list[list[str]]:
    """The `-S` overrides of every `dvc exp run` command in the README's bash blocks."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
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
        choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                   if o.is_sweep_override() else [o.input_line]
                   for o in parser.parse_overrides(overrides)]
        for point in itertools.product(*choices):
            params = compose_params(list(point), conf_dir=ROOT / "conf")
            assert params["models"].keys() == {"frame_cnn", "cnn3d", "cnn_gru"}, point
