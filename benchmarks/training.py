"""Training throughput per model on the pipeline's cached arrays, against the CPU's ceiling.

    .venv/bin/python benchmarks/training.py [--models cnn3d ...] [--epochs 6]
        [--setting train.jit_compile=true ...] [--json FILE]

The rows and the machine go to `--json` (default `benchmarks/results/training.json`, from
which the docs' table is rendered).

Each model is trained by the pipeline's own `fit_model` on the training split the `features`
and `frames` stages cached (run `dvc repro` first), with the project's params.yaml, for
`--epochs` epochs (early stopping off), once with today's settings and once per `--setting`:
a `key=value` override of the model's own section (`train.jit_compile=true`,
`train.batch_size=16`, `head.units=[64]`; YAML values) or an environment variable of the run's
process (an upper-case name: `TF_ENABLE_ONEDNN_OPTS=0`, TensorFlow's Eigen kernels in place of
the oneDNN ones the pipeline turns on, `pipeline/tensorflow_start.py`). Each run is a process
of its own, as
each `train@<model>` stage is (a process that has trained before trains faster: oneDNN's
primitives and TensorFlow's memory are warm). Per run:

- first epoch: its wall time, and its overhead over a steady epoch (tracing, compiling);
- steady epoch: the median of the later epochs, with the validation pass Keras runs in each;
- clips/s: training clips per second of a steady epoch;
- achieved GFLOP/s of training: clips/s x 3 x the forward FLOPs of one clip (TensorFlow's
  profiler over the model's forward graph; a recurrent layer's loop counted from its shapes),
  the usual estimate of forward + backward, and its share of the CPU's float32 ceiling
  (OpenVINO's chained matrix products, as `benchmarks/feature_caching.py` measures it).

The CPU's model and flags come first (and ONEDNN_MAX_CPU_ISA when set: run with
`ONEDNN_MAX_CPU_ISA=AVX2` to approximate an AVX2-only CPU on one with AVX-512). Compare figures
of one run, not across runs or machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from cpu import cpu_description  # noqa: E402  (benchmarks/cpu.py, beside this script)
from feature_caching import matmul_gmac_per_s  # noqa: E402
from results import Column, default_path, save_results  # noqa: E402

COLUMNS = [
    Column("model", "model"),
    Column("setting", "setting", "code"),
    Column("first_epoch_s", "first epoch, s", ".1f"),
    Column("first_epoch_overhead_s", "its overhead over a steady one, s", ".1f"),
    Column("steady_epoch_s", "steady epoch, s", ".1f"),
    Column("clips_per_s", "clips/s", ".1f"),
    Column("train_gflop_per_s", "training GFLOP/s", ".1f"),
    Column("share_of_ceiling", "share of the ceiling", ".1%"),
    Column("val_accuracy", "val accuracy (a sanity check)", ".3f"),
]
NOTES = (
    "steady: the median epoch after the first (training and the validation pass); overhead: "
    "the first epoch minus a steady one (tracing, compiling); GFLOP/s: 3 × the forward FLOPs "
    "of a clip × clips/s; share of the ceiling: of the float32 ceiling measured in the same "
    "run; val accuracy: after the last epoch, not a score."
)


def forward_flops_per_clip(model, example) -> float:
    """FLOPs of one clip's forward pass: TensorFlow's profiler over the model's graph, plus
    each GRU's loop from its shapes (the profiler counts a loop's body once, not per step)."""
    import keras
    import tensorflow as tf
    from tensorflow.python.profiler.model_analyzer import profile
    from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

    spec = tf.nest.map_structure(lambda a: tf.TensorSpec((1,) + a.shape[1:], a.dtype), example)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    options = ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    flops = profile(graph, options=options).total_float_ops
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.GRU):
            sequence = layer.input[0] if isinstance(layer.input, list) else layer.input  # [x, mask]
            steps, inputs = sequence.shape[1], sequence.shape[-1]
            units = layer.units
            flops += 2 * 3 * (inputs * units + units * units) * steps  # 3 gates, MAC = 2 FLOPs
    return float(flops)


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return EpochTimer()


def environment_setting(setting: str) -> tuple[str, str] | None:
    """(NAME, value) when `setting` is `NAME=value` with an upper-case NAME: an environment
    variable of the run's process, not a model setting."""
    key, sep, value = setting.partition("=")
    return (key, value) if sep and key.isupper() else None


def with_override(params: dict, model: str, setting: str, epochs: int) -> dict:
    """params with `setting` (`a.b=value`, YAML) applied to `models.<model>`, `epochs` epochs
    and early stopping that never stops."""
    import copy

    import yaml

    params = copy.deepcopy(params)
    cfg = params["models"][model]
    if setting and not environment_setting(setting):
        key, _, value = setting.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            if not isinstance(node.get(part), dict):
                sys.exit(f"--setting {setting}: models.{model}.{'.'.join(parents)} is no section")
            node = node[part]
        if leaf not in node:
            sys.exit(f"--setting {setting}: models.{model} has no key {key}")
        node[leaf] = yaml.safe_load(value)
    cfg["train"]["epochs"] = epochs
    cfg["train"]["early_stopping"]["patience"] = epochs + 1
    return params


def measure(params: dict, model: str, setting: str, epochs: int) -> dict:
    import keras

    import pipeline.models.fitting as fitting
    from pipeline.config import dataset_classes
    from pipeline.schema import parse_params
    from pipeline.stages.train import fit_job, load_data

    config = parse_params(with_override(params, model, setting, epochs))
    job = fit_job(config, model)
    data, _ = load_data(config.paths, job.model)  # as the stage: with every cached frame
    x_train, y_train = data["train"]  # for temporal jitter
    # a folder dataset's: as the clean stage found
    num_classes = len(dataset_classes(config.dataset.classes, config.paths.clean))
    timer = epoch_timer()
    stock_logger = fitting.epoch_logger
    # the per-epoch MLflow logger's slot (no run here)
    fitting.epoch_logger = lambda prefix="": timer
    try:
        trained, history, _ = fitting.fit_model(job, data, num_classes, config.seed)
    finally:
        fitting.epoch_logger = stock_logger
    flops = forward_flops_per_clip(trained, x_train)
    first, steady = timer.seconds[0], statistics.median(timer.seconds[1:])
    clips = len(y_train)
    keras.backend.clear_session()
    return {
        "model": model,
        "setting": setting or "as configured",
        "first_epoch_s": first,
        "first_epoch_overhead_s": first - steady,
        "steady_epoch_s": steady,
        "clips_per_s": clips / steady,
        "forward_gflop_per_clip": flops / 1e9,
        "train_gflop_per_s": 3 * flops * clips / steady / 1e9,
        "val_accuracy": float(history.history["val_accuracy"][-1]),
    }


def run_in_new_process(model: str, setting: str, epochs: int) -> dict:
    """`measure` in a fresh Python process (its row as JSON on the last line of stdout); a
    setting the model cannot train with gives a row with its `error` instead."""
    cmd = [sys.executable, __file__, "--run", model, setting, "--epochs", str(epochs)]
    env = dict(os.environ)
    if variable := environment_setting(setting):
        env[variable[0]] = variable[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        error = lines[-1] if lines else "failed"
        return {"model": model, "setting": setting or "as configured", "error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from pipeline.tensorflow_start import prepare_tensorflow

    prepare_tensorflow()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: every model")
    parser.add_argument("--epochs", type=int, default=6, help="the first + steady ones")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        help="models.<model>.KEY=VALUE or an environment variable NAME=VALUE (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=default_path("training"), help="results")
    parser.add_argument("--run", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.json = args.json.resolve()  # before the benchmark changes directory
    if args.epochs < 2:
        sys.exit("--epochs: at least 2 (the first epoch, then a steady one)")
    logging.basicConfig(level=logging.WARNING)
    os.chdir(ROOT)

    from pipeline.config import load_params

    params = load_params()
    if args.run:  # one measurement, in this process
        print(json.dumps(measure(params, args.run[0], args.run[1], args.epochs)))
        return
    models = args.models or list(params["models"])
    unknown = sorted(set(models) - set(params["models"]))
    if unknown:
        sys.exit(
            f"--models {' '.join(unknown)}: not in params.yaml (one of {list(params['models'])})"
        )
    ceiling = 2 * matmul_gmac_per_s("f32")  # GFLOP/s: a multiply-accumulate is 2 FLOPs
    print(f"CPU: {cpu_description()}")
    print(
        f"float32 ceiling: {ceiling:.0f} GFLOP/s (OpenVINO matrix products); {args.epochs} "
        f"epochs per run on the cached training split, dataset {params['dataset']['name']}"
    )
    header = (
        f"{'model':10} {'setting':28} {'1st epoch':>9} {'overhead':>9} {'steady':>8} "
        f"{'clips/s':>8} {'GFLOP/clip':>10} {'GFLOP/s':>8} {'ceiling':>8} {'val acc':>8}"
    )
    print(header)
    rows = []
    for model in models:
        for setting in ["", *args.setting]:
            row = run_in_new_process(model, setting, args.epochs)
            rows.append(row)
            if "error" in row:
                print(f"{model:10} {setting:28} failed: {row['error'][:200]}", flush=True)
                continue
            row["share_of_ceiling"] = row["train_gflop_per_s"] / ceiling
            print(
                f"{model:10} {row['setting']:28} {row['first_epoch_s']:8.1f}s "
                f"{row['first_epoch_overhead_s']:8.1f}s {row['steady_epoch_s']:7.1f}s "
                f"{row['clips_per_s']:8.1f} {row['forward_gflop_per_clip']:10.3f} "
                f"{row['train_gflop_per_s']:8.1f} {row['share_of_ceiling']:8.1%} "
                f"{row['val_accuracy']:8.3f}",
                flush=True,
            )
    print(NOTES)
    save_results(
        args.json,
        "training",
        f"Each model trained by the pipeline's `fit_model` for {args.epochs} epochs on the "
        f"cached training split of dataset `{params['dataset']['name']}`, early stopping off, "
        f"each setting in a process of its own; the CPU's float32 ceiling (OpenVINO's chained "
        f"matrix products) measured in the same run: {ceiling:.0f} GFLOP/s.",
        COLUMNS,
        rows,
        NOTES,
        ceiling_gflop_per_s=ceiling,
        epochs=args.epochs,
    )


if __name__ == "__main__":
    main()
