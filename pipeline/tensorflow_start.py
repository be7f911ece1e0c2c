"""What every process of the package sets before TensorFlow loads: its start-up lines kept out
(`pipeline.logs`) and its oneDNN kernels on.

TensorFlow's Linux wheels turn their oneDNN kernels on by themselves only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (TensorFlow RFC 400); on any other x86 CPU (an
AVX2-only laptop, most AMD EPYC and Ryzen parts) they run Eigen's kernels, whose 3D
convolutions train about 5x slower (`benchmarks/training.py`, docs/performance.md). The
environment variable TensorFlow reads, TF_ENABLE_ONEDNN_OPTS, is the user's to set: 0 keeps
Eigen's kernels, 1 (the default here) oneDNN's.
"""

from __future__ import annotations

import os

from pipeline.logs import quiet_tensorflow_startup

ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def use_onednn_kernels() -> None:
    """TensorFlow's oneDNN kernels on whatever the CPU, unless the user set ONEDNN_ENV. Read by
    TensorFlow once, as it loads: call before it is imported. Worker processes inherit it."""
    os.environ.setdefault(ONEDNN_ENV, "1")


def prepare_tensorflow() -> None:
    """Call in an entry point (a stage, predict, a sweep, a served model, a worker) before
    TensorFlow is imported."""
    use_onednn_kernels()
    quiet_tensorflow_startup()
