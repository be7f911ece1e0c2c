"""What every config section shares: strictness, and the kinds of numbers and texts."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_NAMES = ("frame_cnn", "cnn3d", "cnn_gru")
SCORES = ("accuracy", "balanced_accuracy", "macro_f1")
BACKBONES = Literal["resnet101v2", "efficientnetb0"]

Count = Annotated[int, Field(ge=1)]  # a whole number >= 1
Natural = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]  # 0..1, both included
Rate = Annotated[float, Field(ge=0, lt=1)]  # a dropout rate: 0 <= r < 1
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]


class Section(BaseModel):
    """A config section: no unknown keys, no silent casts between types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
