"""Stage `train@<model>`: train one model on the cached arrays, evaluate it on the test split.

    python -m pipeline.stages.train --model cnn_gru                 # the DVC stage
    python -m pipeline.sweep -m model=cnn_gru model.dropout=0.1,0.3  # a sweep (pipeline/sweep.py)

Writes `models/<model>/model.keras`, `metrics/<model>.json` (for `dvc metrics show`) and
`reports/<model>/` (confusion matrix PNG, classification report, per-class scores, test
predictions, learning curves, the misclassified test clips, every seed's validation and test
probabilities for the ensemble row), and logs one MLflow run with all of it plus the model.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from pipeline.atomic import write_json_atomic
from pipeline.config import resolve
from pipeline.data.arrays import (
    evaluation_views,
    fixed_inputs,
    input_dir,
    load_cache,
    stacked_views,
)
from pipeline.models.distributed import is_chief, training_strategy
from pipeline.models.evaluation import backbone_ms_per_clip, clip_probabilities, model_ms_per_clip
from pipeline.models.fit_job import FitJob
from pipeline.models.fitting import fit_model
from pipeline.models.members import epochs_trained
from pipeline.schema.base import MODEL_NAMES
from pipeline.stages.cli import stage_cli
from pipeline.stages.train_outputs import (
    SCORE_KEYS,
    log_run_metrics,
    save_and_log_model,
    summary_line,
    write_probabilities,
    write_reports,
)
from pipeline.stages.train_seeds import extra_seeds, repeat_over_seeds, train_as_worker

if TYPE_CHECKING:
    from pipeline.schema import ModelSection, Params
    from pipeline.schema.sections import Features, Paths

log = logging.getLogger(__name__)


def train_and_evaluate(
    config: Params, name: str, parent_run_id: str | None = None, extra_tags: dict | None = None
) -> dict:
    """Train model `name`, evaluate it on validation and test, write its outputs under
    `paths.*`, log one MLflow run (a child of `parent_run_id` in a sweep) and return the
    summary that goes to `metrics/<name>.json`: load -> fit -> evaluate -> write reports and
    the model -> repeat over the other seeds -> summary."""
    import mlflow

    from pipeline.tracking import (
        DESCRIPTION_TAG,
        run_description,
        run_name,
        run_tags,
        use_experiment,
    )

    # first: a multi-worker cluster sets up TensorFlow's collectives before anything runs
    training_strategy(config.distribute.strategy)
    job, paths, seed = fit_job(config, name), config.paths, config.seed
    model_cfg = job.model
    classes = json.loads((job.cache_dir / "classes.json").read_text())
    dataset = json.loads((resolve(paths.clean) / "dataset.json").read_text())
    data, clips = load_data(paths, model_cfg)
    if not is_chief(job.strategy):
        return train_as_worker(
            job, [seed, *extra_seeds(seed, config.train_seeds)], data, len(classes)
        )

    use_experiment(config.mlflow.experiment)
    reports = resolve(paths.reports) / name
    tags = {**run_tags(name, dataset), **(extra_tags or {})}
    with mlflow.start_run(
        run_name=run_name(name, dataset),
        tags=tags,
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
    ) as run:
        log_run_inputs(config, model_cfg, dataset, classes, len(data["train"][1]))
        model, history, train_time = fit_model(job, data, len(classes), seed)
        probabilities, scores, summary = evaluate(
            model_cfg, config.features, config.frames.size, model, data, classes, seed
        )
        summary.update(train_time_s=round(train_time, 2), epochs=epochs_trained(history.history))
        log_run_metrics(summary, scores)
        test_probs = probabilities[seed, "test"]
        write_reports(
            paths,
            config.gallery.max_clips,
            name,
            data["test"][1],
            test_probs,
            classes,
            scores,
            clips,
            history,
        )
        save_and_log_model(
            paths,
            name,
            model,
            preprocessing_record(config, model_cfg, classes),
            run.info.run_id,
            summary,
        )
        spread = repeat_over_seeds(
            job,
            extra_seeds(seed, config.train_seeds),
            data,
            classes,
            summary,
            tags,
            run_name(name, dataset),
            probabilities,
        )
        write_probabilities(reports, probabilities, clips, classes)
        if spread:
            summary.update({k: round(v, 4) for k, v in spread.items()})
            mlflow.log_metrics({f"test_{k}": v for k, v in spread.items() if k != "seeds"})
            mlflow.log_metric("seeds", spread["seeds"])
        mlflow.set_tag(DESCRIPTION_TAG, run_description(name, dataset, seed, summary))
    write_json_atomic(resolve(paths.metrics) / f"{name}.json", summary)
    log.info("%s: %s", name, summary_line(summary, spread))
    return summary


def fit_job(config: Params, name: str) -> FitJob:
    """What fitting model `name` reads of the config (`pipeline.models.fit_job.FitJob`)."""
    model = config.models.named(name)
    return FitJob(
        model=model,
        strategy=config.distribute.strategy,
        augment=config.augment,
        pad_value=config.frames.pad_value,
        cache_dir=input_dir(config.paths, model),
    )


def preprocessing_record(config: Params, model: ModelSection, classes: list[str]) -> dict:
    """What the logged model carries of this run's config to preprocess new clips as its test
    clips were (`pipeline.serving.classifier`)."""
    from pipeline.serving.classifier import feature_preprocessing, preprocessing_config

    pre = preprocessing_config(model, classes, config.frames, config.clean.min_frames)
    if model.input == "features":
        pre["features"] = feature_preprocessing(
            config.features, config.seed, resolve(config.paths.features)
        )
    return pre


def load_data(paths: Paths, model: ModelSection) -> tuple[dict, dict]:
    """The model's inputs and labels per split: its fixed frames of each clip for training
    and test, every view of each validation clip (`stacked_views`: with `tta_views`, the
    frames it is evaluated on, so its best epoch is chosen on them), the views of the
    evaluation, each split's labels, every cached training frame for
    `train.temporal_jitter`, and the validation and test clips' table."""
    caches = {split: load_cache(paths, model, split) for split in ("train", "val", "test")}
    if not len(caches["val"][1]) or not len(caches["test"][1]):
        raise ValueError(
            "the validation or test split is empty: the dataset needs more "
            "recording groups per class (see the clean stage's warnings)"
        )
    num_frames = model.num_frames
    data = {
        s: (fixed_inputs(cache, num_frames), labels) for s, (cache, labels, _) in caches.items()
    }
    # without `tta_views` the one view is the fixed frames already selected: not a second copy
    data["views"] = {
        s: evaluation_views(caches[s][0], num_frames, True) if model.tta_views else [data[s][0]]
        for s in ("val", "test")
    }
    data["labels"] = {s: data[s][1] for s in ("val", "test")}
    data["val"] = stacked_views(data["views"]["val"], data["labels"]["val"])
    if model.train.temporal_jitter:
        data["train_cache"] = caches["train"][0]
    return data, {s: caches[s][2] for s in ("val", "test")}


def log_run_inputs(
    config: Params, model: ModelSection, dataset: dict, classes: list, train_clips: int
) -> None:
    """The run's params (the model's section, frames, features, seeds, the dataset), its
    composed config as `config.yaml` and its training data."""
    import mlflow

    from pipeline.tracking import flatten, log_dataset

    described = {"name": dataset["name"], "split_source": dataset.get("split_source")}
    inputs = {
        "model": model.model_dump(),
        "frames": config.frames.model_dump(),
        "features": config.features.model_dump(),
        "seed": config.seed,
        "train_seeds": config.train_seeds,
        "dataset": {**described, "classes": ",".join(classes)},  # in class-index order
    }
    mlflow.log_params(flatten(inputs))
    if model.train.oversample:
        mlflow.log_params(flatten({"augment": config.augment.model_dump()}))
    mlflow.log_dict(config.composed, "config.yaml")  # the composed config this run trained with
    log_dataset(config.dataset, dataset, train_clips, resolve(config.paths.clean))


def evaluate(
    model_cfg: ModelSection,
    features: Features,
    frame_size: int,
    model,
    data: dict,
    classes: list,
    seed: int,
):
    """(probabilities per (seed, split), test scores, summary): the model's validation and
    test probabilities in stored order (averaged over views and mirror images where the
    config says), their scores and what a clip costs at inference on this machine (a model on
    features adds the `features` backbone's cost on frames of `frame_size`)."""
    from pipeline.evaluate import classification_metrics

    batch_size, hflip = model_cfg.train.batch_size, getattr(model_cfg, "tta_hflip", False)
    probabilities = {
        (seed, split): clip_probabilities(model, views, batch_size, hflip)
        for split, views in data["views"].items()
    }
    scores, val_scores = (
        classification_metrics(data["labels"][s], probabilities[seed, s].argmax(axis=1), classes)
        for s in ("test", "val")
    )
    model_ms = model_ms_per_clip(model, data["views"]["test"], batch_size, hflip)
    x_test = data["test"][0]
    streams = 2 if features.motion else 1  # appearance (+ motion)
    backbone_ms = (
        backbone_ms_per_clip(
            features.backbone,
            features.output_layer,
            frame_size,
            x_test["features"].shape[1] * streams,
        )
        if isinstance(x_test, dict)
        else 0.0
    )
    summary = {
        **{k: scores[k] for k in SCORE_KEYS},
        "params": int(model.count_params()),
        "test_clips": int(len(data["test"][1])),
        **{f"val_{k}": val_scores[k] for k in SCORE_KEYS},
        # per clip on this machine, from cached frames; cnn_gru adds its feature backbone
        "inference_ms_per_clip": round(model_ms + backbone_ms, 2),
        "model_ms_per_clip": round(model_ms, 2),
        "backbone_ms_per_clip": round(backbone_ms, 2),
    }
    return probabilities, scores, summary


def main(argv: list[str] | None = None) -> None:
    def model_option(parser):
        parser.add_argument("--model", required=True, choices=MODEL_NAMES)

    stage_cli(
        "train",
        __doc__.splitlines()[0],
        lambda config, args: train_and_evaluate(config, args.model),
        argv,
        model_option,
    )


if __name__ == "__main__":
    main()
