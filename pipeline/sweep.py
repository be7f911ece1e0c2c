"""Hydra multirun sweeps of one model on the cached frames/features, one MLflow parent run each.

    python -m pipeline.sweep -m model=cnn_gru model.dropout=0.1,0.3,0.5
    python -m pipeline.sweep -m model=cnn3d 'model.train.learning_rate=1e-3,1e-4'
    python -m pipeline.sweep -m model=cnn_gru hparams_search=cnn_gru_optuna   # extra [optuna]

Every job trains `model` with the composed config (`conf/sweep.yaml` = `conf/config.yaml` +
the sweep settings) on the arrays `dvc repro` cached, and writes its model, metrics and
reports under its own `multirun/<date>/<time>/<job>/` folder (gitignored), never into the DVC
outputs. A callback opens one MLflow parent run per multirun; each job is a child run with
its parameters and metrics; when the sweep ends the parent names the best child by the
validation score (`val_<compare.metric>`: choosing on the test split would leak it). A job
that fails is recorded as a FAILED child and the sweep goes on. The job's return value is the
validation score, which Hydra's Optuna sweeper maximises.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.config import repo_root
from pipeline.data.arrays import load_arrays
from pipeline.errors import PipelineError, refusal_message, server_refusals
from pipeline.logs import setup_logging
from pipeline.tensorflow_start import prepare_tensorflow

if TYPE_CHECKING:
    from pipeline.schema import ModelSection
    from pipeline.schema.sections import Paths

log = logging.getLogger(__name__)

PARENT_ENV = "HANDBALL_SWEEP_PARENT_RUN_ID"
# set when the grid breaks the schema or the tracking server refuses the sweep: jobs are skipped
INVALID_ENV = "HANDBALL_SWEEP_INVALID"


def objective_name(metric: str) -> str:
    """The validation score a sweep maximises (`metric` is `compare.metric`):
    `val_<metric>` in the metrics summary, `eval_val_<metric>` in MLflow."""
    return f"val_{metric}"


def child_runs(client, parent: str) -> list:
    """The MLflow runs whose parent is run `parent` (the jobs of one sweep)."""
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


class MlflowParentRun(Callback):
    """Opens the multirun's MLflow parent run and, at the end, names its best child on it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import run_tags, use_experiment

        try:
            check_sweep_points(config)  # before any job and before the parent run
        except PipelineError as exc:  # Hydra would only warn and run every job anyway
            log.error("%s", exc)
            os.environ[INVALID_ENV] = "1"
            return
        except Exception as exc:  # noqa: BLE001 - a grid this check cannot expand
            log.warning(
                "the sweep's grid was not checked up front (%s); each job checks its own", exc
            )
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        name = config.model.name
        tags = {
            **run_tags(f"sweep:{name}"),
            "sweep_dir": str(sweep_dir),
            "sweep_overrides": " ".join(config.hydra.overrides.task),
            "mlflow.runName": f"sweep {name} {sweep_dir.name}",
        }
        try:
            with server_refusals():
                exp_id = use_experiment(config.mlflow.experiment)
                run = MlflowClient().create_run(exp_id, tags=tags)
        except PipelineError as exc:  # the tracking server refused: no job could log either
            log.error("%s", exc)
            os.environ[INVALID_ENV] = "1"
            return
        os.environ[PARENT_ENV] = run.info.run_id
        log.info("sweep: MLflow parent run %s", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow.tracking import MlflowClient

        parent = os.environ.pop(PARENT_ENV, None)
        if not parent:
            return
        client = MlflowClient()
        key = "eval_" + objective_name(OmegaConf.select(config, "compare.metric"))
        children = child_runs(client, parent)
        finished = [c for c in children if c.info.status == "FINISHED" and key in c.data.metrics]
        client.log_metric(parent, "jobs", len(children))
        client.log_metric(parent, "jobs_failed", sum(c.info.status == "FAILED" for c in children))
        if finished:
            best = max(finished, key=lambda c: c.data.metrics[key])
            client.set_tag(parent, "best_child_run_id", best.info.run_id)
            client.set_tag(
                parent, "best_child_overrides", best.data.tags.get("sweep_job_overrides", "")
            )
            client.log_metric(parent, f"best_{key}", best.data.metrics[key])
            log.info(
                "sweep: best job by %s = %.4f: %s (run %s)",
                key,
                best.data.metrics[key],
                best.data.tags.get("sweep_job_overrides", ""),
                best.info.run_id,
            )
        client.set_terminated(parent, "FINISHED" if finished else "FAILED")


def apply_model_overrides(composed: dict, name: str, cfg: DictConfig, overrides: list[str]) -> None:
    """`model.<key>=value` on the command line sets `models.<name>.<key>` of the `composed`
    config: the `model` node only names the model; its settings come from `models.<name>`
    (experiment scaling included), with the user's `model.*` overrides on top."""
    target = OmegaConf.create(composed["models"][name])
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            OmegaConf.update(target, key[len("model.") :], OmegaConf.select(cfg, key), merge=False)
    composed["models"][name] = OmegaConf.to_container(target, resolve=True)


def job_params(cfg: dict, overrides: list[str]) -> tuple[str, dict]:
    """(model name, the config a job trains with, as composed): the sweep config without its
    `model` node, whose name picks the model and whose overrides go to `models.<name>`."""
    composed = {k: v for k, v in cfg.items() if k != "hydra"}
    name = composed.pop("model")["name"]
    apply_model_overrides(composed, name, OmegaConf.create(cfg), overrides)
    return name, composed


def check_sweep_points(config: DictConfig) -> None:
    """Every point of the sweep's grid checked against the schema before the first job: the
    discrete sweeps (`a,b,c`, `choice(...)`, `range(...)`) are expanded; a continuous
    `interval(...)` (Optuna) is checked in each job. A PipelineError names the problems and
    the point, so a bad value stops the sweep in a second instead of failing every job."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.schema import InvalidConfig, validate_params

    base = OmegaConf.to_container(config, resolve=False)
    base.pop("hydra", None)
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    # a sweep over a config group (`model=cnn3d,cnn_gru`) composes other files: each job
    # checks its own config; the points checked here take the group as composed
    sweeps = [
        o
        for o in parsed
        if o.is_sweep_override()
        and o.is_discrete_sweep()
        and not isinstance(OmegaConf.select(config, o.key_or_group), DictConfig)
    ]
    keys = [o.key_or_group for o in sweeps]
    problems: dict[str, list[str]] = {}
    for values in itertools.product(*(list(o.sweep_iterator()) for o in sweeps)):
        point = OmegaConf.create(base)
        for key, value in zip(keys, values):
            OmegaConf.update(point, key, value, merge=False, force_add=True)
        cfg = OmegaConf.to_container(point, resolve=True)
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]
        try:
            validate_params(job_params(cfg, overrides + list(config.hydra.overrides.task))[1])
        except InvalidConfig as exc:
            for line in exc.problems:
                problems.setdefault(line, []).append(" ".join(overrides) or "every job")
    if problems:
        raise PipelineError(
            "the sweep's config breaks the schema; no job was started:\n  "
            + "\n  ".join(
                f"{line} (at {'; '.join(points[:3])})" for line, points in problems.items()
            )
        )


def check_cached_inputs(paths: Paths, model: ModelSection) -> None:
    """Every split of the cache `model` reads is there, else the error names it and `dvc
    repro`."""
    from pipeline.data.arrays import input_dir

    directory = input_dir(paths, model)
    for split in ("train", "val", "test"):
        load_arrays(directory / split, "labels")  # names the missing cache and `dvc repro`


def sweep_job(cfg: DictConfig) -> float:
    """One multirun job: train `cfg.model` into this job's folder; returns the validation score
    (NaN when the job failed, after recording it as a FAILED child run)."""
    task_overrides = list(HydraConfig.get().overrides.task)
    if os.environ.get(INVALID_ENV):  # before importing TensorFlow: a skip takes no time
        log.warning("sweep job skipped (%s): the sweep did not start (above)", task_overrides)
        return math.nan
    import mlflow

    from pipeline.schema import parse_params
    from pipeline.stages.train import train_and_evaluate
    from pipeline.tracking import run_tags, use_experiment

    name, composed = job_params(OmegaConf.to_container(cfg, resolve=True), task_overrides)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = " ".join(task_overrides)
    parent = os.environ.get(PARENT_ENV)
    composed["paths"] = {
        **composed["paths"],
        **{k: str(job_dir / k) for k in ("models", "metrics", "reports")},
    }
    try:
        if parent is None:
            raise PipelineError(
                "no MLflow parent run: the sweep callback did not start "
                "(see Hydra's warnings above)"
            )
        # checks an Optuna trial's value too; the grid was checked at the start
        config = parse_params(composed)
        check_cached_inputs(config.paths, config.models.named(name))
        summary = train_and_evaluate(
            config, name, parent_run_id=parent, extra_tags={"sweep_job_overrides": overrides}
        )
        return float(summary[objective_name(config.compare.metric)])
    except Exception as exc:  # one failed job must not stop the sweep
        refusal = refusal_message(exc)
        log.error("sweep job %s (%s) failed: %s", job_dir.name, overrides, refusal or exc)
        if refusal:  # the tracking server would refuse recording the failure too
            return math.nan
        if parent and mlflow.active_run() is None and not failed_run_recorded(parent, overrides):
            use_experiment(composed["mlflow"]["experiment"])
            with mlflow.start_run(
                run_name=f"{name} (failed)",
                parent_run_id=parent,
                nested=True,
                tags={**run_tags(name), "sweep_job_overrides": overrides, "error": str(exc)[:5000]},
            ) as run:
                pass
            mlflow.tracking.MlflowClient().set_terminated(run.info.run_id, "FAILED")
        return math.nan


def failed_run_recorded(parent: str, overrides: str) -> bool:
    """Whether this job's child run exists already (train_and_evaluate's run ends FAILED)."""
    from mlflow.tracking import MlflowClient

    return any(
        r.data.tags.get("sweep_job_overrides") == overrides
        for r in child_runs(MlflowClient(), parent)
    )


def hydra_main() -> None:
    """`python -m pipeline.sweep -m ...`: Hydra reads its arguments from sys.argv."""
    setup_logging()
    prepare_tensorflow()
    conf_dir = str(repo_root() / "conf")
    os.environ.pop(INVALID_ENV, None)
    hydra.main(config_path=conf_dir, config_name="sweep", version_base="1.3")(sweep_job)()
    if os.environ.pop(INVALID_ENV, None):
        sys.exit(2)


if __name__ == "__main__":
    hydra_main()
