"""The learning-rate schedule is evaluated once per traced training step (Keras' AdamW asks
for it again for every variable's weight decay), with the same values and the same training
as the schedule itself."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import model_section

from pipeline.models.schedules import OncePerStep, learning_rate


class CountedCosine(keras.optimizers.schedules.CosineDecay):
    """Keras' cosine schedule, counting its evaluations."""

    calls = 0

    def __call__(self, step):
        CountedCosine.calls += 1
        return super().__call__(step)


def cosine() -> CountedCosine:
    return CountedCosine(1e-3, decay_steps=20, warmup_target=1e-2, warmup_steps=4)


def trained_weights(schedule, steps: int = 6) -> list[np.ndarray]:
    """A 4-layer dense network trained `steps` steps by AdamW (weight decay, weight
    averaging) at `schedule`, from a fixed init and fixed data."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(8, activation="relu") for _ in range(3)]
    model = keras.Sequential([keras.Input((4,)), *layers, keras.layers.Dense(3, "softmax")])
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=0.05, use_ema=True, ema_momentum=0.9
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8 * steps, 4)), rng.integers(0, 3, 8 * steps)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def test_a_traced_step_evaluates_the_schedule_once_and_trains_the_same():
    CountedCosine.calls = 0
    plain = trained_weights(cosine())
    per_variable = CountedCosine.calls
    CountedCosine.calls = 0
    once = trained_weights(OncePerStep(cosine()))
    assert per_variable >= 8  # Keras: once per weight (8 of them) for the decay, and more
    assert CountedCosine.calls <= 2, CountedCosine.calls
    for a, b in zip(plain, once):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("step", [0, 3, 4, 10, 25])
def test_eagerly_the_schedule_gives_its_own_values(step):
    schedule = cosine()
    assert float(OncePerStep(schedule)(step)) == float(schedule(step))


def test_the_configured_schedule_round_trips_through_a_saved_model(tiny_params, tmp_path):
    """frame_cnn's configured schedule (cosine after a warm-up): a model saved with its
    optimiser loads back with the same schedule (compiled)."""
    train = model_section("frame_cnn", tiny_params["models"]["frame_cnn"]).train
    assert train.lr_decay == "cosine" and train.warmup_epochs > 0
    schedule = learning_rate(train, steps_per_epoch=5)
    assert isinstance(schedule, OncePerStep)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule), loss="mse")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras").optimizer._learning_rate
    assert isinstance(loaded, OncePerStep)
    for step in (0, 5, 10, 30, 5 * train.epochs):
        assert float(loaded(step)) == pytest.approx(float(schedule(step)))
