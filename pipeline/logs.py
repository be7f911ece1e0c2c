"""Logging for the package's processes: one log format, and TensorFlow's C++ start-up lines
(which users read as errors) kept out of them. Entry points call `quiet_tensorflow_startup`
before TensorFlow loads: the stage commands' package (`pipeline.stages`, as it is imported),
predict, sweeps, a served model's `load_context`, worker processes; importing `pipeline`
itself changes nothing.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

# TensorFlow's C++ start-up lines, which users read as errors: CUDA probing on machines without
# a GPU, oneDNN and CPU-instruction notes, absl's "before InitializeLog" banner. TensorFlow
# 2.19+ writes them before it reads TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442).
TF_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog\(\)|oneDNN custom operations|cudart_stub|Could not find cuda drivers"
    r"|cpu_feature_guard|rebuild TensorFlow with the appropriate compiler flags"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer|TF-TRT Warning"
    r"|failed call to cuInit"
)
QUIET_TF_ENV = "HANDBALL_QUIET_TF"  # marks TF_CPP_MIN_LOG_LEVEL as set by us, not by the user
# Error-level lines TensorFlow writes while training and predicting that ask nothing of anyone:
# - with op determinism on (every training run, `seed_everything`), tf.data runs the parallel
#   map of Keras' array adapter sequentially and the rewritten node keeps an attribute the
#   sequential op lacks; TensorFlow ignores it ("Unknown attributes will be ignored");
# - oneDNN falling back to Eigen for boolean tensors (the GRU's mask).
TF_RUNTIME_NOISE = re.compile(
    r"NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition"
    r"|oneDNN supports DT_BOOL only on platforms with AVX-512"
)


@contextlib.contextmanager
def streamed_c_stderr(noise: re.Pattern) -> Iterator[None]:
    """Pass file descriptor 2 through a pipe while the block runs, line by line as they come
    (long work keeps showing its progress), dropping the lines that match `noise`.

    The block ends as soon as every line written in it has been passed on, not when the pipe
    closes: a process started in the block (a pool's forkserver) keeps its copy of the pipe
    for as long as it lives, and its later lines are still passed on."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect: nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    end_marker = b"\0end of the filtered block %d:%d\n" % (os.getpid(), read_end)
    block_ended = threading.Event()

    def forward() -> None:  # never stops reading early: a full pipe would block the writers
        try:
            with os.fdopen(read_end, "rb") as pipe:
                for line in pipe:
                    if line == end_marker:
                        block_ended.set()
                    elif not noise.search(line.decode(errors="replace")):
                        with contextlib.suppress(OSError):
                            while line:
                                line = line[os.write(saved, line) :]
        finally:
            block_ended.set()
            os.close(saved)  # the forwarder's own: it can outlive the block

    forwarder = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.write(write_end, end_marker)  # after every line of the block, in the pipe's order
        os.close(write_end)
        block_ended.wait(timeout=10)


def quiet_tensorflow_runtime() -> contextlib.AbstractContextManager:
    """While TensorFlow trains or predicts, keep `TF_RUNTIME_NOISE` out of the output, unless
    the user chose TF_CPP_MIN_LOG_LEVEL (see `quiet_tensorflow_startup`)."""
    if os.environ.get(QUIET_TF_ENV) != "1":
        return contextlib.nullcontext()
    return streamed_c_stderr(TF_RUNTIME_NOISE)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once and runs its import inside `filtered_c_stderr`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with streamed_c_stderr(TF_STARTUP_NOISE):
                exec_module(module)
                # probing the devices now keeps its "failed call to cuInit" (no GPU) in here
                with contextlib.suppress(Exception):
                    module.config.list_physical_devices()

        spec.loader.exec_module = quiet_exec_module
        return spec


def quiet_tensorflow_startup() -> None:
    """Keep TensorFlow's start-up lines out of this package's processes (stages, their
    workers, predict, served models), unless the user chose TF_CPP_MIN_LOG_LEVEL: then
    TensorFlow logs as they asked. Call before TensorFlow is imported."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and os.environ.get(QUIET_TF_ENV) != "1":
        return  # the user's own setting wins
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's own INFO and WARNING lines
    os.environ[QUIET_TF_ENV] = "1"  # inherited by worker processes, which do the same
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
