"""Stage `features`: ResNet101V2 features of every cached frame (its activations at
`features.output_layer`, the last by default, averaged over space: 2048-d; 256-d at
conv2_block3_out, the embedded sample's), in batches.

With `features.motion: true` each frame also gets the features of its change since the previous
frame (a second, motion stream through the same backbone, as in two-stream action recognition),
appended: twice the width per frame.

Outputs one folder per split under `paths.features`: `features.npy` (clips x N x D, float32),
`labels.npy`, `mask.npy` and `clips.csv` (copied from the frames cache, row order unchanged),
and `runtime.json`: the `features.runtime` and `features.precision` that computed them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
from dataclasses import dataclass, replace

import numpy as np
from tqdm import tqdm

from pipeline.atomic import atomic_dir, write_json_atomic
from pipeline.config import SPLITS, resolve
from pipeline.data.arrays import load_arrays, save_arrays
from pipeline.errors import PipelineError
from pipeline.models.backbones import (
    build_feature_backbone,
    feature_width,
    frame_features,
    weights_digest,
)
from pipeline.models.seeding import seed_everything
from pipeline.parallel import cluster_map, dask_client
from pipeline.schema import Params
from pipeline.schema.sections import Augment, Dask, Features, Paths
from pipeline.stages.cli import stage_cli

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureJob:
    """What computing a clip's features takes, here and on every Dask worker: the `features`
    section, the cached frames' size and padding value, the seed and the `augment` section
    (for the augmented copies of training clips)."""

    features: Features
    frame_size: int
    pad_value: int
    seed: int
    augment: Augment


def stage_features(backbone, preprocess, frames, cfg: Features, desc: str = "", out=None):
    """`frame_features` with the stage's batch size and motion stream (`features.*`)."""
    return frame_features(backbone, preprocess, frames, cfg.batch_size, desc, out, cfg.motion)


def augmented_clip_features(
    backbone, preprocess, frames: np.ndarray, mask: np.ndarray, index: int, job: FeatureJob
) -> tuple[np.ndarray, np.ndarray]:
    """Features of `features.augmented_copies` augmented versions of training clip `index`
    (frames: N x H x W x 3): (copies x N x D float32, copies x N masks). The augmentation is
    seeded by `seed` and the clip's index, so it does not matter which process computes it."""
    from pipeline.data.augment import augment_clip

    rng = np.random.default_rng([job.seed, index])
    versions = [
        augment_clip(frames, mask, job.augment, rng, job.pad_value)
        for _ in range(job.features.augmented_copies)
    ]
    features = stage_features(
        backbone, preprocess, np.stack([f for f, _ in versions]), job.features
    )
    return features, np.stack([m for _, m in versions])


def seeded_backbone(job: FeatureJob, initial=None):
    """(backbone, preprocess, (runtime, precision)) as the stage builds it: `weights: null`
    means a random init seeded by `seed`; `initial` replaces the weights (see `built_weights`)."""
    seed_everything(job.seed)
    return build_feature_backbone(job.features.model_dump(), job.frame_size, initial=initial)


def built_weights(job: FeatureJob) -> tuple[str, list[np.ndarray]]:
    """(sha256, weights) of the backbone as this process builds it for a local run, for the
    Dask workers. They do not rebuild it from the seed: Keras draws the seeds of a random init
    from Python's global `random`, which the threads of a Dask worker use too."""
    keras_float32 = job.features.model_copy(update={"runtime": "keras", "precision": "float32"})
    backbone, _, _ = seeded_backbone(replace(job, features=keras_float32))
    weights = backbone.get_weights()
    return weights_digest(weights), weights


_WORKER_BACKBONES: dict[str, tuple] = {}


def worker_backbone(job: FeatureJob, weights: tuple[str, list[np.ndarray]]):
    """The stage's backbone with the (digest, weights) `built_weights` sent, built once per Dask
    worker process for all the blocks it computes with those weights."""
    digest, arrays = weights
    key = json.dumps([job.features.model_dump(), job.frame_size, digest])
    if key not in _WORKER_BACKBONES:
        _WORKER_BACKBONES[key] = seeded_backbone(job, initial=arrays)
    return _WORKER_BACKBONES[key]


def backbone_facts(
    job: FeatureJob, weights: tuple[str, list[np.ndarray]]
) -> tuple[int, tuple[str, str]]:
    """Dask task: the feature width and (runtime, precision) the workers compute with."""
    backbone, _, runtime = worker_backbone(job, weights)
    return feature_width(backbone, job.features.motion), runtime


def features_block(job: FeatureJob, weights: tuple[str, list[np.ndarray]], block: tuple) -> tuple:
    """Dask task: features of a block of clips (first index, frames, masks, augment?) and, for
    training clips, of their augmented copies; with the (runtime, precision) that made them."""
    first, frames, mask, augment = block
    backbone, preprocess, runtime = worker_backbone(job, weights)
    features = stage_features(backbone, preprocess, frames, job.features)
    augmented = [
        augmented_clip_features(backbone, preprocess, frames[i], mask[i], first + i, job)
        for i in range(len(frames) if augment else 0)
    ]
    return features, augmented, runtime


def features_here(backbone, preprocess, job: FeatureJob, split, frames, mask, out, aug) -> None:
    """One split's features in this process, into `out` (and `aug`: features, masks)."""
    stage_features(backbone, preprocess, frames, job.features, desc=f"features {split}", out=out)
    for i in tqdm(range(len(frames) if aug else 0), desc="augmented train features", unit="clip"):
        aug[0][i], aug[1][i] = augmented_clip_features(
            backbone, preprocess, frames[i], mask[i], i, job
        )


def features_on_cluster(
    client, job: FeatureJob, per_task: int, weights, runtime, split, frames, mask, out, aug
) -> None:
    """One split's features on the Dask cluster, `per_task` clips per task, written into `out`
    (and `aug`) in order; every block must come from the same runtime and precision."""
    starts = range(0, len(frames), per_task)

    def block(start: int) -> list:  # the arrays travel with the task: no file to share
        part = slice(start, start + per_task)
        return [((start, np.asarray(frames[part]), np.asarray(mask[part]), bool(aug)), None)]

    blocks = (block(start) for start in starts)
    results = cluster_map(
        client, features_block, blocks, f"features {split}", unit="block", shared=(job, weights)
    )
    for start, (features, augmented, block_runtime) in zip(starts, results, strict=True):
        if tuple(block_runtime) != tuple(runtime):
            raise PipelineError(
                f"Dask workers computed features with different runtimes ({runtime} and "
                f"{block_runtime}): give every worker the same image (OpenVINO, CPU kind)"
            )
        out[start : start + len(features)] = features
        for i, (copies, masks) in enumerate(augmented):
            aug[0][start + i], aug[1][start + i] = copies, masks


def extract_features(job: FeatureJob, paths: Paths, dask: Dask) -> None:
    """Features of every cached frame of every split (and of the augmented copies of the
    training clips), here or on the Dask cluster `dask.scheduler` names, into `paths.features`."""
    cfg = job.features
    copies = cfg.augmented_copies
    frames_dir = resolve(paths.frames)
    address = dask.scheduler
    total = 0
    # built before a Dask client starts its threads (see `built_weights`)
    weights = built_weights(job) if address else None
    with dask_client(dask) if address else contextlib.nullcontext() as client:
        if client is None:
            backbone, preprocess, runtime = seeded_backbone(job)
            dim = feature_width(backbone, cfg.motion)
            compute = functools.partial(features_here, backbone, preprocess, job)
        else:  # each worker gets the weights once and builds the runtime's model from them
            weights = client.scatter([weights], broadcast=True)[0]  # one future, not one per array
            dim, runtime = client.submit(backbone_facts, job, weights, pure=False).result()
            compute = functools.partial(
                features_on_cluster, client, job, dask.clips_per_task, weights, runtime
            )

        with atomic_dir(resolve(paths.features)) as tmp:
            for split in SPLITS:
                frames, labels, mask = load_arrays(
                    frames_dir / split, "frames", "labels", "mask", mmap_mode="r"
                )
                clips, n = frames.shape[:2]
                (tmp / split).mkdir()
                out = np.lib.format.open_memmap(
                    tmp / split / "features.npy", mode="w+", dtype=np.float32, shape=(clips, n, dim)
                )
                aug = None
                if split == "train" and copies > 0:  # for oversampling
                    aug = (
                        np.lib.format.open_memmap(
                            tmp / split / "aug_features.npy",
                            mode="w+",
                            dtype=np.float32,
                            shape=(clips, copies, n, dim),
                        ),
                        np.zeros((clips, copies, n), dtype=bool),
                    )
                compute(split, frames, mask, out, aug)
                out.flush()
                del out
                save_arrays(tmp / split, labels=labels, mask=mask)
                if aug:
                    aug[0].flush()
                    save_arrays(tmp / split, aug_mask=aug[1])
                    del aug
                shutil.copy2(frames_dir / split / "clips.csv", tmp / split / "clips.csv")
                total += clips * n
            shutil.copy2(frames_dir / "classes.json", tmp / "classes.json")
            # what actually computed them (after any fallback): a logged cnn_gru serves with it
            runtime, precision = runtime
            write_json_atomic(tmp / "runtime.json", {"runtime": runtime, "precision": precision})
    log.info(
        "features: %d frames -> %d-d %s features (%s, %s)%s in %s%s%s",
        total,
        dim,
        cfg.backbone,
        runtime,
        precision,
        " (appearance + motion streams)" if cfg.motion else "",
        paths.features,
        f" (+ {copies} augmented copies of each training clip)" if copies else "",
        f" on the Dask cluster at {address}" if address else "",
    )


def run(config: Params) -> None:
    """The stage: `extract_features` with the config's sections."""
    frames = config.frames
    job = FeatureJob(config.features, frames.size, frames.pad_value, config.seed, config.augment)
    extract_features(job, config.paths, config.dask)


def main(argv: list[str] | None = None) -> None:
    stage_cli("features", __doc__.splitlines()[0], lambda p, a: run(p), argv)


if __name__ == "__main__":
    main()
