"""The data, comparison and tracking sections of `params.yaml`, and the whole (`Params`)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Discriminator, Field, PrivateAttr, Tag, model_validator

from pipeline.schema.base import (
    BACKBONES,
    MODEL_NAMES,
    SCORES,
    Count,
    Fraction,
    Natural,
    NonNegative,
    Positive,
    Section,
    Text,
)
from pipeline.schema.model_sections import Models

# the setting by which each model reads optical flow
FLOW_SETTINGS = (("frame_cnn", "motion"), ("cnn3d", "motion"), ("cnn_gru", "flow_grid"))


class SampleSpec(Section):
    seed: int
    counts: dict[Text, Count]
    clips_per_scene: Count
    width: Annotated[int, Field(ge=32)]
    height: Annotated[int, Field(ge=32)]
    fps: Positive
    min_length: Count
    max_length: Count
    noise: NonNegative

    @model_validator(mode="after")
    def lengths_in_order(self):
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")
        return self


class DatasetBase(Section):
    name: Text | None
    source: Text  # each kind's own choices below
    tracked: Text
    split_file: Text | None = None
    classes: Annotated[list[Text], Field(min_length=2)] | None
    path: Text | None = None
    url: Text | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    subdir: Text | None = None
    extensions: list[Annotated[str, Field(pattern=r"^\.\w+$")]] | None = None
    aliases: dict[Text, Text] = {}
    merge: dict[Text, Text] = {}
    max_unpacked_gb: Positive = 100

    @model_validator(mode="after")
    def classes_once(self):
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes {self.classes} list a class twice")
        return self


class SampleDataset(DatasetBase):
    """The embedded sample: generated from `sample`, one count per class."""

    source: Literal["sample"]
    classes: Annotated[list[Text], Field(min_length=2)]
    sample: SampleSpec

    @model_validator(mode="after")
    def one_count_per_class(self):
        if set(self.sample.counts) != set(self.classes):
            raise ValueError(
                f"sample.counts has {sorted(self.sample.counts)}, classes are "
                f"{sorted(self.classes)}: one count per class"
            )
        return self


class FootageDataset(DatasetBase):
    """Real clips: a folder, an archive or a URL (an experiment's `sample` sizes go unused)."""

    source: Literal["folder", "archive", "url"]
    sample: dict | None = None

    @model_validator(mode="after")
    def source_has_what_it_needs(self):
        needs = {"folder": ("path",), "archive": ("path",), "url": ("url", "sha256")}
        missing = [key for key in needs[self.source] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"source={self.source!r} needs {', '.join(missing)}")
        return self


def dataset_kind(value) -> str:
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    return "SampleDataset" if source == "sample" else "FootageDataset"


Dataset = Annotated[
    Annotated[SampleDataset, Tag("SampleDataset")]
    | Annotated[FootageDataset, Tag("FootageDataset")],
    Discriminator(dataset_kind),
]


class Dask(Section):
    scheduler: Text | None
    clips_per_task: Count
    connect_timeout_s: Positive


class Paths(Section):
    checked_params: Text
    raw: Text
    clean: Text
    frames: Text
    features: Text
    models: Text
    metrics: Text
    reports: Text


class Clean(Section):
    min_frames: Count
    min_duration_s: NonNegative
    min_width: Count
    min_height: Count
    min_clips_per_class: Count
    val_fraction: Annotated[float, Field(gt=0, lt=1)]
    test_fraction: Annotated[float, Field(gt=0, lt=1)]
    group_pattern: Text

    @model_validator(mode="after")
    def fractions_leave_training_clips(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leave "
                "no training clips: their sum must be < 1"
            )
        try:
            pattern = re.compile(self.group_pattern)
        except re.error as exc:
            raise ValueError(f"group_pattern is not a regular expression ({exc})") from exc
        if "group" not in pattern.groupindex:
            raise ValueError("group_pattern needs a named group `(?P<group>...)`")
        return self


class Farneback(Section):
    """OpenCV's calcOpticalFlowFarneback arguments."""

    pyr_scale: Annotated[float, Field(gt=0, lt=1)]
    levels: Natural
    winsize: Annotated[int, Field(ge=3)]
    iterations: Count
    poly_n: Literal[5, 7]
    poly_sigma: Positive


class Flow(Section):
    enabled: bool
    max_speed: Positive
    farneback: Farneback


class Frames(Section):
    num_frames: Count
    sampling: Literal["uniform", "center", "start"]
    size: Annotated[int, Field(ge=16)]
    pad_value: Annotated[int, Field(ge=0, le=255)]
    flow: Flow


class Features(Section):
    motion: bool
    backbone: BACKBONES
    weights: Text | None
    # the backbone ends at this layer (e.g. conv3_block4_out); null: the whole backbone
    output_layer: Text | None = None
    batch_size: Count
    runtime: Literal["openvino", "keras"]
    precision: Literal["float32", "bfloat16"]
    augmented_copies: Natural


class Augment(Section):
    hflip: Fraction
    rotation_deg: NonNegative
    blur: Fraction
    noise_std: NonNegative
    temporal_jitter: Natural


class Baseline(Section):
    size: Count
    C: Annotated[list[Positive], Field(min_length=1)]


# ---- comparison and tracking --------------------------------------------------------------


class Ensemble(Section):
    members: list[Literal[MODEL_NAMES]] | None
    weights: Literal["equal", "fitted"]
    weight_step: Annotated[float, Field(gt=0, le=0.5)]
    pooling: Literal["arithmetic", "geometric"]

    @model_validator(mode="after")
    def step_divides_one(self):
        if abs(1 / self.weight_step - round(1 / self.weight_step)) > 1e-9:
            raise ValueError(f"weight_step={self.weight_step} must divide 1 into equal parts")
        if self.members is not None and len(set(self.members)) != len(self.members):
            raise ValueError(f"members {self.members} list a model twice")
        return self


class Compare(Section):
    metric: Literal[SCORES]
    bootstrap_samples: Count
    confidence: Annotated[float, Field(gt=0, lt=1)]
    register_as: Text | None
    alias: Text
    promote: Literal["better", "always"]
    ensemble: Ensemble

    @model_validator(mode="after")
    def one_placeholder(self):
        """`register_as` may hold `{dataset}` and no other `{...}` (a typo would register
        every dataset's models under one literal name)."""
        rest = (self.register_as or "").replace("{dataset}", "")
        if "{" in rest or "}" in rest:
            raise ValueError(
                f"register_as={self.register_as!r}: the only placeholder is {{dataset}} "
                "(the dataset's name)"
            )
        return self


class Gallery(Section):
    max_clips: Natural


class Mlflow(Section):
    experiment: Text


class Distribute(Section):
    strategy: Literal["none", "mirrored", "multi_worker"]


class Params(Section):
    """The whole of `params.yaml`; `composed` is the mapping it was read from, as written (what
    a run logs as its `config.yaml`), or for a config built otherwise its typed settings."""

    _composed: dict = PrivateAttr(default_factory=dict)

    @property
    def composed(self) -> dict:
        return self._composed or self.model_dump(mode="json")

    models: Models
    features: Features
    dataset: Dataset
    seed: Natural
    train_seeds: Annotated[list[Natural], Field(min_length=1)] | None
    workers: Count | None
    dask: Dask
    paths: Paths
    clean: Clean
    frames: Frames
    augment: Augment
    baseline: Baseline
    compare: Compare
    gallery: Gallery
    mlflow: Mlflow
    distribute: Distribute

    @model_validator(mode="after")
    def flow_is_cached_for_its_readers(self):
        """A model that reads optical flow needs the frames stage to cache it."""
        readers = [
            f"models.{name}.{key}={getattr(model, key)!r}"
            for name, key in FLOW_SETTINGS
            if (model := getattr(self.models, name)).reads_flow
        ]
        if readers and not self.frames.flow.enabled:
            raise ValueError(
                f"{', '.join(readers)} read(s) optical flow, which frames.flow.enabled=false "
                "does not cache: set frames.flow.enabled=true (-S inputs=flow does)"
            )
        return self

    @model_validator(mode="after")
    def frames_to_vary_in_time(self):
        """Temporal jitter and views pick among more cached frames than the model reads."""
        cached = self.frames.num_frames
        for name, model in self.models:
            keys = [
                f"models.{name}.{key}=true"
                for key, on in (
                    ("train.temporal_jitter", model.train.temporal_jitter),
                    ("tta_views", model.tta_views),
                )
                if on
            ]
            if keys and (model.num_frames is None or cached < 2 * model.num_frames):
                raise ValueError(
                    f"{' and '.join(keys)} pick(s) among the cached frames, but "
                    f"models.{name}.num_frames={model.num_frames} with frames.num_frames="
                    f"{cached} leaves no choice: cache at least twice the frames the model "
                    f"reads (e.g. frames.num_frames={2 * (model.num_frames or cached)} "
                    f"models.{name}.num_frames={model.num_frames or cached})"
                )
        return self

    @model_validator(mode="after")
    def mixup_on_keras_fit(self):
        """The multi-worker training loop takes class indices, not mixup's blended targets."""
        if (mixing := self.models.with_mixup()) and self.distribute.strategy == "multi_worker":
            raise ValueError(
                f"{', '.join(mixing)} with distribute.strategy=multi_worker: its training loop "
                "takes class indices, not mixup's blends; use strategy none or mirrored"
            )
        return self
