"""Training with tf.distribute (`distribute.strategy`: none | mirrored | multi_worker).

`mirrored` runs Keras `fit` under MirroredStrategy (the GPUs of one machine). `multi_worker`
(MultiWorkerMirroredStrategy, the cluster named by TF_CONFIG) cannot: Keras 3's `fit` fails
under it (keras-team/keras#20585), so `fit_multi_worker` is a training loop of our own with the
same semantics as `fit` here: every worker draws the same global batches (shuffled from the
seed, or the oversampling dataset's), keeps its share of each, and `strategy.run` computes the
loss over the global batch (`tf.nn.compute_average_loss`) so that the summed gradients are those
of one process; Keras' own callbacks (early stopping, the MLflow logger, History) run on the
per-epoch logs. Every worker evaluates validation on its full copy, so all stop together.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_STRATEGIES: dict[str, object] = {}  # one per process: TensorFlow allows one collective setup


def training_strategy(name: str):
    """The tf.distribute strategy `name` (`distribute.strategy`: none | mirrored |
    multi_worker; None for `none`), made once per process. Call it before TensorFlow runs
    anything: collective ops are configured at start."""
    if name == "none":
        return None
    if name not in _STRATEGIES:
        import tensorflow as tf

        if name == "mirrored":
            _STRATEGIES[name] = tf.distribute.MirroredStrategy()
        else:
            if not os.environ.get("TF_CONFIG"):
                raise PipelineError(
                    "distribute.strategy=multi_worker needs TF_CONFIG (the cluster's workers and "
                    "this process's index), as deploy/k8s/training-job.yaml sets it"
                )
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        log.info(
            "distribute.strategy=%s: %d replicas in sync%s",
            name,
            _STRATEGIES[name].num_replicas_in_sync,
            f", this is worker {worker_index()}" if name == "multi_worker" else "",
        )
    return _STRATEGIES[name]


def worker_index() -> int:
    """This process's index among the workers TF_CONFIG names (0 without TF_CONFIG)."""
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    return int(task.get("index", 0)) if task.get("type", "worker") == "worker" else 0


def is_chief(strategy: str) -> bool:
    """Whether this process writes outputs and logs under `distribute.strategy` `strategy`:
    always, except for the workers other than worker 0 of a `multi_worker` cluster."""
    return strategy != "multi_worker" or worker_index() == 0


def synchronize_batchnorm(model) -> None:
    """BatchNorm layers compute their batch statistics over the global batch (all replicas),
    as they would in one process."""
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def plain_copy(trained, build, sample):
    """`trained` (built under a strategy) rebuilt by `build` outside it, with its weights, so
    that Keras' predict and save run in this process alone; checked to give the same outputs
    on `sample`. Layers with adapted state (Normalization) recompute it from their weights."""
    model = build()
    model.set_weights(trained.get_weights())
    for layer in model._flatten_layers():
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()
    expected = np.asarray(trained(sample, training=False))
    copied = np.asarray(model(sample, training=False))
    if not np.allclose(copied, expected, atol=1e-5):
        raise PipelineError(
            f"the trained {model.name} differs from its copy for saving by up to "
            f"{float(np.abs(copied - expected).max()):.2g}: a layer keeps state outside its weights"
        )
    return model


def take(x, index):
    """Rows `index` of an array or of every array of a dict of inputs."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def global_batches(fit_data: dict, epoch: int, seed: int):
    """(x, y, sample weights) of every global batch of `epoch`, the same on every worker: the
    training arrays shuffled from (seed, epoch), or the batches of an oversampling dataset."""
    if "y" not in fit_data:  # a Keras PyDataset (oversampled clips, temporal jitter)
        for x, y, *w in fit_data["x"].epoch(epoch):
            yield x, y, w[0] if w else np.ones(len(y), np.float32)
        return
    y_all, size = fit_data["y"], int(fit_data["batch_size"])
    weights = fit_data.get("class_weight")
    order = np.random.default_rng([seed, epoch]).permutation(len(y_all))
    for start in range(0, len(order), size):
        index = order[start : start + size]
        y = y_all[index]
        w = [weights[int(c)] for c in y] if weights else np.ones(len(y))
        yield take(fit_data["x"], index), y, np.asarray(w, np.float32)


def fit_multi_worker(
    strategy,
    model,
    optimizer,
    fit_data,
    val,
    epochs: int,
    callbacks,
    seed: int,
    clip_loss,
):
    """Train `model` (built under `strategy.scope()`) for up to `epochs` on `clip_loss` (one
    value per clip: `losses.per_clip_loss`); returns Keras' History with the per-epoch loss,
    accuracy, val_loss and val_accuracy, as `fit` would."""
    import keras
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    sum_ = tf.distribute.ReduceOp.SUM

    def replica_step(x, y, w, total):
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            weighted = clip_loss(y, probs) * w
            loss = tf.nn.compute_average_loss(weighted, global_batch_size=total)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        hits = tf.cast(tf.equal(tf.argmax(probs, -1), tf.cast(y, tf.int64)), tf.float32)
        return tf.reduce_sum(weighted), tf.reduce_sum(hits)

    @tf.function(reduce_retracing=True)
    def train_step(batch, total):
        sums = strategy.run(replica_step, args=(*batch, total))
        return [strategy.reduce(sum_, s, axis=None) for s in sums]

    @tf.function(reduce_retracing=True)
    def infer(x):
        return model(x, training=False)

    def shard(batch):
        """This worker's replicas' parts of a global batch (contiguous, nearly equal)."""
        parts = np.array_split(np.arange(len(batch[1])), replicas)

        def part(ctx):
            rows = parts[ctx.replica_id_in_sync_group]
            return tuple(tf.nest.map_structure(tf.constant, take(v, rows)) for v in batch)

        return strategy.experimental_distribute_values_from_function(part)

    def evaluate(x, y, size):
        probs = np.concatenate(
            [infer(take(x, slice(i, i + size))).numpy() for i in range(0, len(y), size)]
        )
        loss = keras.ops.convert_to_numpy(clip_loss(y, probs)).mean()
        return float(loss), float((probs.argmax(1) == y).mean())

    history = keras.callbacks.History()
    hooks = keras.callbacks.CallbackList([*callbacks, history], model=model)
    hooks.set_params({"epochs": epochs, "verbose": 0})
    model.stop_training = False
    size = int(fit_data.get("batch_size") or 32)
    hooks.on_train_begin()
    for epoch in range(epochs):
        hooks.on_epoch_begin(epoch)
        loss_sum = hits = seen = 0.0
        for batch in global_batches(fit_data, epoch, seed):
            total = tf.constant(len(batch[1]), tf.int32)
            batch_loss, batch_hits = train_step(shard(batch), total)
            loss_sum += float(batch_loss)
            hits += float(batch_hits)
            seen += len(batch[1])
        hooks.on_test_begin()  # as Keras' fit: validation sees averaged weights (ema_momentum)
        val_loss, val_accuracy = evaluate(*val, size)
        hooks.on_test_end()
        logs = {
            "accuracy": hits / seen,
            "loss": loss_sum / seen,
            "val_accuracy": val_accuracy,
            "val_loss": val_loss,
        }
        log.info(
            "epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4f}" for k, v in logs.items())
        )
        hooks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    optimizer.finalize_variable_values(model.trainable_weights)  # as Keras' fit does
    hooks.on_train_end()
    return history
