"""What `model.fit` trains on: the training split as arrays with class weights, or as a
dataset that draws augmented copies of the smaller classes (`train.oversample`), each
clip's frames afresh every epoch (`train.temporal_jitter`) and/or blends of two clips
(`train.mixup`). Validation and test data never pass through here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.arrays import load_arrays, sequence_inputs
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.models.fit_job import FitJob
    from pipeline.schema.sections import Augment

log = logging.getLogger(__name__)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """sklearn's 'balanced' weights for the classes present in training; 1.0 for the rest."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {i: 1.0 for i in range(num_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def training_clips(
    inputs,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    class_weight: dict[int, float] | None = None,
    augment: Augment | None = None,
    pad_value: int = 0,
    cache=None,
    num_frames: int | None = None,
    mixup: float = 0.0,
    num_classes: int = 0,
):
    """A Keras PyDataset over the training clips, for what fixed arrays cannot give:

    - `augment` (`train.oversample`): augmented copies of the smaller classes' clips,
      new copies with new augmentations every epoch; the originals pass untouched;
    - `cache` (`train.temporal_jitter`): each clip's `num_frames` frames drawn afresh every
      epoch from all of its cached frames (one per segment), instead of the fixed ones;
    - `mixup` (`train.mixup`, Beta's alpha): each clip blended with another clip of its batch,
      after the two above; y is then each clip's target over the `num_classes` classes
      (`pipeline.data.augment.mixed_batch`) instead of its class index.

    Batches are (x, y) or, with `class_weight`, (x, y, sample weights). One stream for all
    epochs: batch `i` is batch `i % batches_per_epoch` of epoch `i // batches_per_epoch`, so
    what a batch holds follows from `seed` and its index alone, never from when it is asked
    for (Keras' input pipeline fetches an epoch's first batches before the previous epoch
    has ended; a dataset that redrew at `on_epoch_end` fed epochs another epoch's draw, how
    much of it depending on timing). Infinite for Keras: fit it with
    `steps_per_epoch=batches_per_epoch`. Without a cache, the same batches as before temporal
    jitter existed.
    """
    import keras

    from pipeline.data.arrays import cached_frames, select_frames
    from pipeline.data.augment import augment_clip, mixed_batch, oversample_indices
    from pipeline.data.temporal import jittered_indices
    from pipeline.models.distributed import take

    weights = (
        np.array([class_weight[c] for c in range(max(class_weight) + 1)], np.float32)
        if class_weight
        else None
    )

    def epoch_plan(epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The clips of `epoch` in their order, and which of them are augmented copies."""
        rng = np.random.default_rng([seed, epoch])
        extra = oversample_indices(labels, rng) if augment is not None else []
        order = np.concatenate([np.arange(len(labels)), extra]).astype(int)
        is_copy = np.arange(len(order)) >= len(labels)
        perm = rng.permutation(len(order))
        return order[perm], is_copy[perm]

    class TrainingClips(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.clips_per_epoch = len(epoch_plan(0)[0])  # oversampling tops up to the same
            self.batches_per_epoch = int(np.ceil(self.clips_per_epoch / batch_size))

        @property
        def num_batches(self):
            return None  # one stream over every epoch (see `training_clips`)

        def __getitem__(self, index):
            epoch, batch = divmod(index, self.batches_per_epoch)
            order, is_copy = epoch_plan(epoch)  # a permutation of the clips: microseconds
            part = slice(batch * batch_size, (batch + 1) * batch_size)
            rows, copies = order[part], is_copy[part]
            rng = np.random.default_rng([seed, epoch, batch])
            if cache is None:
                x = take(inputs, rows)
            else:
                picks = jittered_indices(cached_frames(cache), num_frames, len(rows), rng)
                x = select_frames(take(cache, rows), picks)
            if copies.any():
                ones = np.ones(x.shape[1], dtype=bool)
                x = np.stack(
                    [
                        augment_clip(clip, ones, augment, rng, pad_value)[0] if copy else clip
                        for clip, copy in zip(x, copies)
                    ]
                )
            y = labels[rows]
            w = None if weights is None else weights[y]
            if mixup:
                x, y, w = mixed_batch(x, y, w, mixup, num_classes, rng)
            return (x, y) if w is None else (x, y, w)

        def epoch(self, epoch: int) -> list:
            """Every batch of `epoch`, in order."""
            start = epoch * self.batches_per_epoch
            return [self[start + b] for b in range(self.batches_per_epoch)]

    return TrainingClips()


def oversampled_features(
    inputs: dict, labels: np.ndarray, features_dir: Path, seed: int
) -> tuple[dict, np.ndarray]:
    """Training features plus copies of the smaller classes' clips, each copy taken from the
    cached features of an augmented version of the clip (`features.augmented_copies`)."""
    from pipeline.data.augment import oversample_indices

    directory = features_dir / "train"
    if not (directory / "aug_features.npy").is_file():
        raise PipelineError(
            "train.oversample needs augmented training features: set features.augmented_copies "
            ">= 1 and rerun the features stage (`dvc repro`)"
        )
    aug, aug_mask = load_arrays(directory, "aug_features", "aug_mask")
    rng = np.random.default_rng(seed)
    extra = oversample_indices(labels, rng)
    version = rng.integers(0, aug.shape[1], size=len(extra))
    copies = sequence_inputs(
        aug[extra, version], aug_mask[extra, version], inputs["features"].shape[1]
    )  # the model's num_frames
    return (
        {k: np.concatenate([inputs[k], copies[k]]) for k in ("features", "mask")},
        np.concatenate([labels, labels[extra]]),
    )


def training_data(job: FitJob, seed: int, x_train, y_train, num_classes: int, cache=None) -> dict:
    """The `model.fit` arguments for the training split: class weights by default, or
    (`train.oversample: true`) augmented copies of the smaller classes and no weights; with
    `train.temporal_jitter`, frames drawn afresh each epoch from `cache` (every cached frame
    of the training clips); with `train.mixup`, clips blended in pairs. Validation and test
    data never pass through here."""
    train = job.model.train
    batch_size, oversample, jitter = train.batch_size, train.oversample, train.temporal_jitter
    mixup = train.mixup
    weights = (
        balanced_class_weights(y_train, num_classes)
        if train.class_weights and not oversample
        else None
    )
    if jitter and cache is None:
        raise ValueError(f"models.{job.model.name}.train.temporal_jitter needs the cached frames")
    if oversample and train.class_weights:
        log.info("train.oversample is on: class weights are not used (classes are balanced)")
    if oversample and isinstance(x_train, dict):  # cached features: their copies are read here
        n_clips = len(y_train)
        x_train, y_train = oversampled_features(x_train, y_train, job.cache_dir, seed)
        log.info(
            "oversampling: %d training clips -> %d with augmented copies", n_clips, len(y_train)
        )
        oversample = False  # no copies left to make; blended below with mixup
    if not (oversample or jitter or mixup):
        return {
            "x": x_train,
            "y": y_train,
            "batch_size": batch_size,
            "class_weight": weights,
            "shuffle": True,
        }
    data = training_clips(
        x_train,
        y_train,
        batch_size,
        seed,
        class_weight=weights,
        augment=job.augment if oversample else None,
        pad_value=job.pad_value,
        cache=cache if jitter else None,
        num_frames=job.model.num_frames,
        mixup=mixup,
        num_classes=num_classes,
    )
    log.info(
        "training clips: %d per epoch%s%s%s",
        data.clips_per_epoch,
        f" ({len(y_train)} with augmented copies)" if oversample else "",
        ", frames drawn afresh each epoch (temporal jitter)" if jitter else "",
        f", blended in pairs (mixup, alpha {mixup:g})" if mixup else "",
    )
    # shuffled by its own draw (Keras would warn that it ignores `shuffle` on an infinite one)
    return {
        "x": data,
        "class_weight": None,
        "steps_per_epoch": data.batches_per_epoch,
        "shuffle": False,
    }
