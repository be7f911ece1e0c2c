"""What fitting one model reads of the config, gathered once by the train stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.schema import ModelSection
    from pipeline.schema.sections import Augment


@dataclass(frozen=True)
class FitJob:
    """What fitting one model reads of the config: the model's section, the tf.distribute
    strategy, and for `train.oversample` the augmentation, the frames' padding value and the
    cache with the augmented copies' features (`pipeline.stages.train.fit_job` makes it)."""

    model: ModelSection
    strategy: str  # distribute.strategy
    augment: Augment
    pad_value: int  # frames.pad_value
    cache_dir: Path  # the model's cached inputs (`paths.frames` or `paths.features`)
