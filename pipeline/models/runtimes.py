"""What runs a Keras model for inference: Keras itself, or OpenVINO compiled for the CPU, in
float32 or bfloat16; what this machine can run of that (with a log line where it cannot); and
the OpenVINO conversion, kept in a cache so that it is paid once per model and machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

RUNTIMES = ("keras", "openvino")
PRECISIONS = ("float32", "bfloat16")
# Where converted models are kept (OpenVINO IR, named by a digest of the model, its weights and
# the OpenVINO version). Override with this variable; unset: $XDG_CACHE_HOME or ~/.cache.
CACHE_VARIABLE = "HANDBALL_OPENVINO_CACHE"
# What runs a logged frame_cnn or cnn3d in `predict` and serving: openvino (default; float32,
# the evaluated Keras probabilities to ~1e-6) or keras.
INFERENCE_RUNTIME_VARIABLE = "HANDBALL_INFERENCE_RUNTIME"
# How many OpenVINO infer requests a compiled model keeps for callers in parallel threads
# (created as callers need them; past this many, a caller waits for one to be free). Unset:
# the threads `mlflow models serve` runs predictions on, asyncio's min(32, CPUs + 4).
INFER_REQUESTS_VARIABLE = "HANDBALL_INFER_REQUESTS"


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def tensorflow_sees_gpu() -> bool:
    """Whether TensorFlow has a GPU to run Keras models on."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def usable_runtime(
    runtime: str, precision: str, runtime_key: str, precision_key: str
) -> tuple[str, str]:
    """(runtime, precision) as this machine can run them, the keys naming the settings in
    errors and log lines: OpenVINO not installed, or a GPU that TensorFlow uses (OpenVINO runs on the
    CPU here) -> Keras; no bfloat16 instructions on the CPU that computes -> float32."""
    if runtime not in RUNTIMES:
        raise ValueError(f"{runtime_key}={runtime!r}: one of {RUNTIMES}")
    if precision not in PRECISIONS:
        raise ValueError(f"{precision_key}={precision!r}: one of {PRECISIONS}")
    gpu = tensorflow_sees_gpu()
    if runtime == "openvino" and gpu:
        log.warning(
            "%s=openvino runs on the CPU, but TensorFlow has a GPU here: running Keras on the GPU",
            runtime_key,
        )
        runtime = "keras"
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            log.warning(
                "%s=openvino, but OpenVINO is not installed here "
                "(pip install 'openvino>=2025.1'): running Keras",
                runtime_key,
            )
            runtime = "keras"
    if precision == "bfloat16" and not gpu and not cpu_has_bfloat16():
        log.warning(
            "%s=bfloat16, but this CPU has no bfloat16 instructions "
            "(AVX512-BF16 or AMX): computing in float32",
            precision_key,
        )
        precision = "float32"
    return runtime, precision


def feature_runtime(cfg: dict) -> tuple[str, str]:
    """`usable_runtime` of the `features` section `cfg` (or what a logged model recorded)."""
    runtime, precision = cfg.get("runtime") or "keras", cfg.get("precision") or "float32"
    return usable_runtime(runtime, precision, "features.runtime", "features.precision")


def cache_dir() -> Path:
    """The folder of converted models: $HANDBALL_OPENVINO_CACHE, else
    $XDG_CACHE_HOME/handball-actions/openvino, else ~/.cache/handball-actions/openvino."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "handball-actions" / "openvino"


def model_digest(keras_model) -> str:
    """A digest of what the converted model depends on: every layer's type and configuration
    (less its name, which Keras numbers anew each time a model is built), the input shape,
    every weight's bytes and the OpenVINO version: a model trained again, another input size or
    a new OpenVINO gets a new entry."""
    import keras
    import openvino as ov

    digest = hashlib.sha256(f"{ov.get_version()} {keras_model.input_shape}".encode())
    for layer in keras_model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.Model):
            continue  # its layers are visited one by one
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        digest.update(type(layer).__name__.encode())
        digest.update(json.dumps(config, sort_keys=True, default=repr).encode())
    for weight in keras_model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:32]


def inference_function(keras_model):
    """`keras_model`'s forward pass for inference (`training=False`) as a TensorFlow concrete
    function of a batch of any size: what OpenVINO converts. The same graph in a third of the
    time of a SavedModel (`keras_model.export`: 17 s against 5 s for a frame_cnn of 3 frames
    of 80x80 on a 2-core Xeon)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *keras_model.input_shape[1:]), keras_model.inputs[0].dtype)
    return tf.function(lambda x: keras_model(x, training=False), input_signature=[spec])


def converted_model(keras_model):
    """The OpenVINO model of `keras_model` (its `inference_function` -> OpenVINO IR), from the
    cache when it holds it; a new conversion is saved there atomically (float32 weights kept).
    A cache that cannot be written is logged and skipped."""
    import openvino as ov

    core = ov.Core()
    folder = cache_dir()
    name = model_digest(keras_model)
    xml = folder / f"{name}.xml"
    if xml.is_file():
        try:
            return core.read_model(xml)
        except RuntimeError as exc:
            log.warning("unreadable OpenVINO cache entry %s (%s): converting again", xml, exc)
    model = ov.convert_model(inference_function(keras_model))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".partial-") as tmp:
            ov.save_model(model, Path(tmp) / xml.name, compress_to_fp16=False)
            # the .xml last: where it exists, its .bin is complete
            os.replace(Path(tmp) / f"{name}.bin", folder / f"{name}.bin")
            os.replace(Path(tmp) / xml.name, xml)
    except OSError as exc:
        log.warning("could not keep the OpenVINO model in %s (%s): not cached", folder, exc)
    return model


def infer_request_limit() -> int:
    """The infer requests one compiled model may keep (INFER_REQUESTS_VARIABLE, checked)."""
    value = os.environ.get(INFER_REQUESTS_VARIABLE, "").strip()
    if not value:
        return min(32, (os.cpu_count() or 1) + 4)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{INFER_REQUESTS_VARIABLE}={value!r}: must be a whole number >= 1")
    return int(value)


class InferRequestPool:
    """OpenVINO infer requests shared by threads. A request runs one inference at a time (a
    second caller gets "Infer Request is busy", or reads the other's output), so each caller
    takes an idle request, or a new one while fewer than `limit` exist, else waits for one."""

    def __init__(self, compiled, limit: int):
        self._compiled = compiled
        self._slots = threading.BoundedSemaphore(limit)
        self._idle: list = []
        self._lock = threading.Lock()
        self.created = 0

    @contextmanager
    def request(self) -> Iterator:
        with self._slots:
            with self._lock:
                request = self._idle.pop() if self._idle else None
                if request is None:
                    self.created += 1
            if request is None:
                request = self._compiled.create_infer_request()
            try:
                yield request
            finally:
                with self._lock:
                    self._idle.append(request)


class OpenVinoModel:
    """A Keras model with one input compiled by OpenVINO for the CPU in `precision`; it stands
    in for the Keras model (`predict_on_batch`, `output_shape`) and may be called from several
    threads at once (a pool of infer requests, INFER_REQUESTS_VARIABLE). OpenVINO's CPU plugin
    picks the kernels: bfloat16 uses AVX512-BF16 or AMX."""

    def __init__(self, keras_model, precision: str):
        import openvino as ov

        hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
        limit = infer_request_limit()
        compiled = ov.Core().compile_model(
            converted_model(keras_model), "CPU", {"INFERENCE_PRECISION_HINT": hint}
        )
        self.requests = InferRequestPool(compiled, limit)
        self.output_shape = keras_model.output_shape

    def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
        with self.requests.request() as request:
            outputs = request.infer([np.ascontiguousarray(batch, np.float32)])
            # a copy: the output tensor is the request's, overwritten by its next caller
            return np.array(outputs[0], dtype=np.float32, copy=True)
