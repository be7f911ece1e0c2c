"""The per-clip probabilities report, `reports/<model>/probabilities.csv`: each train stage
writes it, the compare stage's ensemble row reads it.

One row per validation and test clip and training seed: `seed`, `split`, `path`, `label`, then
one probability per class. It lives apart from `pipeline.ensemble` so that changing how the
ensemble pools (a compare-only change) does not make DVC retrain the models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PROBABILITIES_FILE = "probabilities.csv"
CLIP_KEYS = ["seed", "split", "path"]  # what identifies a row across the models' reports


def probability_rows(
    seed: int, split: str, clips: pd.DataFrame, probs: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """One model's probabilities for one seed and split, a row per clip (in `clips`' order)."""
    table = pd.DataFrame(np.asarray(probs, dtype=float).round(6), columns=classes)
    table.insert(0, "seed", int(seed))
    table.insert(1, "split", split)
    table.insert(2, "path", clips["path"].to_numpy())
    table.insert(3, "label", clips["label"].to_numpy())
    return table


def read_probabilities(reports: Path, name: str) -> pd.DataFrame:
    """`reports/<name>/probabilities.csv`; a missing one names the stage that writes it."""
    path = reports / name / PROBABILITIES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `dvc repro train@{name}` first")
    return pd.read_csv(path)
