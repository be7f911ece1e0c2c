"""The train stage's other seeds (`train_seeds`): each trains the model again from its own
seed on the same data and split, for the mean and spread of the scores and the ensemble's
probabilities; a `multi_worker` worker trains every seed in step with the chief.
"""

from __future__ import annotations

import logging

from pipeline.models.distributed import worker_index
from pipeline.models.evaluation import clip_probabilities
from pipeline.models.fit_job import FitJob
from pipeline.models.fitting import fit_model

log = logging.getLogger(__name__)


def extra_seeds(seed: int, train_seeds: list[int] | None) -> list[int]:
    """The seeds of `train_seeds` other than `seed`, in order."""
    return [s for s in train_seeds or [] if s != seed]


def train_as_worker(job: FitJob, seeds: list[int], data: dict, num_classes: int) -> dict:
    """A `multi_worker` worker other than the chief: trains in step with the chief (the same
    `seeds` in the same order) and writes nothing, neither files nor MLflow runs."""
    import keras

    for i, seed in enumerate(seeds):
        if i:
            keras.backend.clear_session()
        fit_model(job, data, num_classes, seed)
    log.info(
        "%s: trained as worker %d; the chief writes the outputs", job.model.name, worker_index()
    )
    return {}


def repeat_over_seeds(
    job: FitJob,
    seeds: list[int],
    data: dict,
    classes: list[str],
    first: dict,
    tags: dict,
    title: str,
    probabilities: dict,
) -> dict:
    """Train again with each of `seeds` (`extra_seeds`), each as a nested MLflow run
    (`<title> · seed N`), add each seed's validation and test probabilities to
    `probabilities` ((seed, split) -> clips x classes) and return mean and standard deviation
    of the test scores over all seeds."""
    import keras
    import mlflow

    from pipeline.evaluate import classification_metrics, seed_spread

    if not seeds:
        return {}
    y_test, model_cfg, name = data["test"][1], job.model, job.model.name
    hflip = getattr(model_cfg, "tta_hflip", False)  # frame models only
    rows = [{k: first[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}]
    for seed in seeds:
        keras.backend.clear_session()
        with mlflow.start_run(
            run_name=f"{title} · seed {seed}", nested=True, tags={**tags, "seed": str(seed)}
        ):
            mlflow.log_param("seed", seed)
            model, _, _ = fit_model(job, data, len(classes), seed)
            for split in ("val", "test"):
                probabilities[seed, split] = clip_probabilities(
                    model, data["views"][split], model_cfg.train.batch_size, hflip
                )
            y_pred = probabilities[seed, "test"].argmax(axis=1)
            scores = classification_metrics(y_test, y_pred, classes)
            rows.append({k: scores[k] for k in rows[0]})
            mlflow.log_metrics({f"test_{k}": v for k, v in rows[-1].items()})
        log.info("%s seed %d: test macro-F1 %.3f", name, seed, rows[-1]["macro_f1"])
    return seed_spread(rows)
