"""A model trained as several networks, its members (`train.networks`): copies of one
architecture, each fitted from its own seed, whose class probabilities are averaged by one
Keras model that is saved, evaluated and served like any other (a deep ensemble;
Lakshminarayanan et al., 2017). On a few dozen training clips a network trained from scratch
lands somewhere else with each seed; the average of a few lands in much the same place.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def member_seeds(seed: int, members: int) -> list[int]:
    """The seed of each member: `seed` for the first (one member is the model as before),
    then seeds drawn from (`seed`, member index), distinct from the run's other seeds."""
    drawn = [int(np.random.SeedSequence([seed, k]).generate_state(1)[0]) for k in range(1, members)]
    return [seed, *drawn]


def averaged_model(members: list, name: str):
    """One Keras model whose output is the mean of `members`' outputs (B,C each), taking the
    same inputs (frames B,T,S,S,I or {"features": B,T,D, "mask": B,T}); the members are kept
    inside it as `member_1`, `member_2`, ..."""
    import keras
    from keras import layers

    members = [uncompiled_copy(member, f"member_{k}") for k, member in enumerate(members, 1)]
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name), members[0].input
    )
    average = layers.Average(name="mean_of_members")([member(inputs) for member in members])
    return keras.Model(inputs, average, name=name)


def uncompiled_copy(model, name: str):
    """`model` with its weights and state but without its optimiser and loss: a compiled model
    nested in another is saved with them, and loading it then needs the pipeline's own classes
    (the learning-rate schedule), which a served model must not. (`clone_model` keeps the
    compilation; the weights go through Keras' weights file, whose loading also restores
    state kept outside the weights, e.g. an adapted Normalization's mean and variance.)"""
    import keras

    copy = keras.Model.from_config(model.get_config())
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "member.weights.h5"
        model.save_weights(weights)
        copy.load_weights(weights)
    copy.name = name
    return copy


def metric_prefix(k: int) -> str:
    """What the per-epoch metrics of member `k` (from 1) are named with: nothing for the first
    (as for a model of one network), `member<k>/` for the others."""
    return f"member{k}/" if k > 1 else ""


def merged_history(histories: list[dict]) -> dict:
    """The members' per-epoch logs as one, each under `metric_prefix` of its member."""
    merged = {}
    for k, history in enumerate(histories, start=1):
        merged.update({f"{metric_prefix(k)}{key}": values for key, values in history.items()})
    return merged


def first_network_history(history: dict) -> dict:
    """The first network's per-epoch logs of a `merged_history` (all of a one-network model's)."""
    return {key: values for key, values in history.items() if "/" not in key}


def epochs_trained(history: dict) -> int:
    """Epochs trained over all members (each member's `loss` has one value per epoch)."""
    return sum(len(values) for key, values in history.items() if key.split("/")[-1] == "loss")
